"""Figures of what explain.py computes, and of a parity table (oracle.compare), as PNG files.

The only module that imports matplotlib, and only when a figure is drawn: it is an optional
extra (`pip install -e ".[plot]"`). Colour maps are viridis and magma, which read in greyscale
and for colour-blind readers (matplotlib's perceptually uniform maps, van der Walt and Smith
2015). Every figure is titled with the model, its weights and its input, is saved at exactly
the size asked for (pixels at 100 dpi), and says so on its face when the weights are random.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .oracle import LayerError

DPI = 100
RANDOM_WARNING = ("RANDOM WEIGHTS: no trained weights were given, so this shows what an untrained "
                  "ConvNeXt computes, not what a trained one has learned (pass real ones with --weights)")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or an InputError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise InputError('drawing figures needs matplotlib: pip install -e ".[plot]" '
                         "(or pip install matplotlib)") from None
    matplotlib.use("Agg")  # no display: figures go to files
    import matplotlib.pyplot as plt

    return plt


def _figure(size: tuple[int, int], title: str, random_weights: bool):
    """A figure of size (width, height) pixels with its title and, for random weights, the warning."""
    plt = pyplot()
    width, height = size
    if width < 200 or height < 200:
        raise InputError(f"a figure needs at least 200 x 200 pixels; got {width} x {height}")
    fig = plt.figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    fig.suptitle(title, fontsize=11, y=0.99)
    if random_weights:
        fig.text(0.5, 0.005, RANDOM_WARNING, ha="center", va="bottom", fontsize=8, color="darkred",
                 wrap=True, bbox={"facecolor": "mistyrose", "edgecolor": "darkred", "boxstyle": "round"})
    return plt, fig


def _save(plt, fig, path: str) -> None:
    """The figure as an RGB PNG (no alpha: a quarter smaller) of exactly the size asked for."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=DPI, format="png")  # no bbox_inches="tight": it would change the size
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").save(path, format="PNG", optimize=True)


def title_of(model_name: str, weights: str, subject: str) -> str:
    return f"{model_name}  |  weights: {weights}  |  {subject}"


def explain_figure(path: str, photo: np.ndarray, cam: np.ndarray, top5: Sequence[tuple[str, float]],
                   channels: dict[str, np.ndarray], title: str, random_weights: bool,
                   size: tuple[int, int] = (1200, 900), target: str | None = None) -> None:
    """The photo (H, W, 3) in [0, 1] with the class activation map cam (h, w) over it (magma,
    stretched over the photo: each map cell covers its stride's patch), the top-5 labels and
    probabilities, and for each stage a strip of its strongest channels {"stages.i": (k, h, w)}
    (viridis, each channel scaled to its own range)."""
    plt, fig = _figure(size, title, random_weights)
    rows = len(channels)
    grid = fig.add_gridspec(2 + rows, 2, height_ratios=[1.5, 1.5] + [1] * rows, hspace=0.45,
                            left=0.04, right=0.98, top=0.93, bottom=0.06)
    ax = fig.add_subplot(grid[:2, 0])
    height, width = photo.shape[:2]
    ax.imshow(np.clip(photo, 0.0, 1.0))
    peak = float(cam.max())
    shown = cam / peak if peak > 0 else cam
    ax.imshow(shown, cmap="magma", alpha=0.55, extent=(0, width, height, 0), interpolation="bilinear",
              vmin=0.0, vmax=1.0)
    ax.set_title(f"Grad-CAM for {short(target or top5[0][0])} ({cam.shape[0]}x{cam.shape[1]} map)", fontsize=9)
    ax.axis("off")
    bars = fig.add_subplot(grid[:2, 1])
    names = [short(name) for name, _ in top5][::-1]
    probs = [p for _, p in top5][::-1]
    bars.barh(range(len(names)), probs, color="#3b528b")  # viridis's blue
    bars.set_yticks(range(len(names)), labels=names, fontsize=9)
    bars.set_xlim(0, max(1e-9, max(probs)) * 1.15)
    bars.set_xlabel("probability", fontsize=9)
    bars.set_title("top-5", fontsize=9)
    for r, (stage, maps) in enumerate(channels.items()):
        strip = grid[2 + r, :].subgridspec(1, len(maps), wspace=0.05)
        for j, channel in enumerate(maps):
            cell = fig.add_subplot(strip[0, j])
            cell.imshow(channel, cmap="viridis", interpolation="nearest")
            cell.set_xticks([])
            cell.set_yticks([])
            if j == 0:
                cell.set_ylabel(stage, fontsize=8)
    _save(plt, fig, path)


def short(label: str, width: int = 28) -> str:
    """A class label's first name, cut to `width` characters: 'tabby, tabby cat' -> 'tabby'."""
    first = label.split(",")[0].strip()
    return first if len(first) <= width else first[: width - 1] + "\u2026"


def erf_figure(path: str, fields: Sequence[np.ndarray], title: str, random_weights: bool,
               size: tuple[int, int] = (1200, 400)) -> None:
    """Each stage's effective receptive field (H, W) side by side, each scaled to its own peak
    (viridis), with the share of the input that holds half of the field's mass."""
    plt, fig = _figure(size, title, random_weights)
    axes = fig.subplots(1, len(fields), squeeze=False)[0]
    fig.subplots_adjust(left=0.02, right=0.98, top=0.80, bottom=0.12, wspace=0.08)
    for i, (ax, erf) in enumerate(zip(axes, fields)):
        ax.imshow(erf / erf.max() if erf.max() > 0 else erf, cmap="viridis", interpolation="nearest")
        ax.set_title(f"stage {i}: half the mass in {half_mass_share(erf):.1%} of pixels", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    _save(plt, fig, path)


def half_mass_share(erf: np.ndarray) -> float:
    """The smallest share of pixels that holds half of the field's total: small for a field
    that stays close to its centre, as Luo et al. find (a Gaussian, not the theoretical square)."""
    values = np.sort(erf.ravel())[::-1]
    total = values.sum()
    if total <= 0:
        return 0.0
    return float((np.searchsorted(np.cumsum(values), 0.5 * total) + 1) / values.size)


def parity_figure(path: str, rows: Sequence["LayerError"], tolerance: float, title: str, random_weights: bool,
                  size: tuple[int, int] = (1400, 600)) -> None:
    """The relative error of every traced tensor in layer order (log scale; an exact 0 is drawn
    at the floor), the tolerance as a line, and the first tensor past it marked."""
    plt, fig = _figure(size, title, random_weights)
    ax = fig.add_subplot(1, 1, 1)
    fig.subplots_adjust(left=0.07, right=0.98, top=0.88, bottom=0.32)
    errors = np.array([r.max_rel for r in rows], dtype=np.float64)
    finite = errors[np.isfinite(errors) & (errors > 0)]
    floor = min(tolerance, finite.min() if finite.size else tolerance) / 10 if tolerance > 0 else 1e-20
    top = max(tolerance, finite.max() if finite.size else tolerance) * 10
    shown = np.clip(np.where(np.isfinite(errors), errors, top), floor, top)
    ok = np.array([r.ok for r in rows])
    x = np.arange(len(rows))
    ax.plot(x, shown, color="#999999", linewidth=0.6)
    ax.scatter(x[ok], shown[ok], s=8, color="#21918c", label="within tolerance")           # viridis teal
    ax.scatter(x[~ok], shown[~ok], s=18, color="#440154", marker="x", label="past tolerance")  # purple
    ax.axhline(tolerance, color="#b5de2b", linewidth=1.5, label=f"tolerance {tolerance:g}")
    ax.set_yscale("log")
    ax.set_ylim(floor, top)
    ax.set_ylabel("max |ours - reference| / max |reference|", fontsize=9)
    stage_starts = {}  # first tensor of each stage: a faint line between stages
    for i, r in enumerate(rows):
        if r.name.startswith("stages."):
            stage_starts.setdefault(".".join(r.name.split(".")[:2]), i)
    ticks = x[:: max(1, len(rows) // 40)]
    ax.set_xticks(ticks, labels=[rows[i].name for i in ticks], rotation=90, fontsize=6)
    for i in stage_starts.values():
        ax.axvline(i - 0.5, color="#dddddd", linewidth=0.8, zorder=0)
    first = next((i for i, r in enumerate(rows) if not r.ok), None)
    if first is not None:
        ax.annotate(f"first past tolerance: {rows[first].name}", (first, shown[first]), xytext=(10, 10),
                    textcoords="offset points", fontsize=8, color="#440154",
                    arrowprops={"arrowstyle": "->", "color": "#440154"})
    ax.legend(fontsize=8, loc="upper left")
    _save(plt, fig, path)
