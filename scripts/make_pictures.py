"""Regenerate docs/pictures/: the walkthrough's figures for the repository's photos.

    python scripts/make_pictures.py                      # seeded random weights (offline)
    python scripts/make_pictures.py --weights tiny.safetensors

Draws, with npconvnext.explain_cli's functions (the `explain`, `erf` and `parity --plot`
commands' own): each photo of tests/data with its Grad-CAM, top-5 and strongest channels; the
effective receptive field of every stage; the parity plot of the first photo's trace against
timm (skipped where timm is not installed). Without --weights the figures say on their face
that the weights are random: no trained weights can be downloaded where they were made.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from npconvnext.explain_cli import draw_erf, draw_explanation, draw_parity, load, photo_and_input  # noqa: E402
from npconvnext.oracle import TOLERANCE, compare, timm_trace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnext_tiny", help="architecture (default convnext_tiny)")
    parser.add_argument("--weights", default=None, help="a weight file; default: seeded random weights")
    parser.add_argument("--out", default=os.path.join(ROOT, "docs", "pictures"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    model = load(args.model, args.weights)
    photos = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "*.png"))
                    + glob.glob(os.path.join(ROOT, "tests", "data", "*.jpg")))
    for photo in photos:
        name = os.path.splitext(os.path.basename(photo))[0]
        output = os.path.join(args.out, f"explain-{name}.png")
        draw_explanation(model, photo, output)
        print(output)
    output = os.path.join(args.out, "erf.png")
    draw_erf(model, output)
    print(output)
    try:
        _, x = photo_and_input(model, photos[0])
        ours = model.trace(x)
        rows = compare(ours, timm_trace(model, x, list(ours)), TOLERANCE[model.dtype.name])
    except ImportError:
        print("timm is not installed: no parity plot", file=sys.stderr)
        return
    output = os.path.join(args.out, "parity.png")
    draw_parity(model, rows, TOLERANCE[model.dtype.name], f"timm, {os.path.basename(photos[0])}", output)
    print(output)


if __name__ == "__main__":
    main()
