"""How long `create_model(None, weights=X.xml)` takes on an OpenVINO IR, FP32 and FP16.

The IRs are written by OpenVINO from a re-randomised timm model (1000 classes); the loads run in
a fresh process that never imports OpenVINO or torch, after one warm-up load (the page cache
and Numba's JIT cache warm). Prints the median and the best of the repeats.

    python benchmarks/bench_load_openvino_ir.py                       # convnext_tiny, 5 loads each
    python benchmarks/bench_load_openvino_ir.py --arch convnext_atto --repeats 1   # a quick check
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPEATS = 5
ARCH = "convnext_tiny"

_LOADER = """
import json, sys, time
import npconvnext
path, repeats = sys.argv[1], int(sys.argv[2])
npconvnext.create_model(None, weights=path)  # warm-up
times = []
for _ in range(repeats):
    start = time.perf_counter()
    npconvnext.create_model(None, weights=path)
    times.append(time.perf_counter() - start)
assert "openvino" not in sys.modules and "torch" not in sys.modules
print(json.dumps(times))
"""


def write_irs(arch: str, folder: str) -> dict[str, str]:
    import openvino as ov
    import timm
    import torch

    net = timm.create_model(arch, pretrained=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the init, gamma included
    model = ov.convert_model(net, example_input=torch.zeros(1, 3, 224, 224))
    files = {"FP32": os.path.join(folder, "fp32.xml"), "FP16": os.path.join(folder, "fp16.xml")}
    ov.save_model(model, files["FP32"], compress_to_fp16=False)
    ov.save_model(model, files["FP16"])
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=ARCH)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        # written in a child process: OpenVINO and torch stay out of the timing process
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
                        f"import bench_load_openvino_ir as b; b.write_irs({args.arch!r}, {folder!r})"], check=True)
        print(f"{args.arch}, 1000 classes: create_model(None, weights=X.xml), {args.repeats} loads after a warm-up")
        print(f"{'IR':6} {'.bin MB':>8} {'median s':>9} {'best s':>8}")
        for kind in ("FP32", "FP16"):
            path = os.path.join(folder, f"{kind.lower()}.xml")
            out = subprocess.run([sys.executable, "-c", _LOADER, path, str(args.repeats)], check=True,
                                 capture_output=True, text=True)
            times = sorted(json.loads(out.stdout.strip().splitlines()[-1]))
            size = os.path.getsize(path[:-4] + ".bin") / 1e6
            print(f"{kind:6} {size:8.1f} {times[len(times) // 2]:9.3f} {times[0]:8.3f}")


if __name__ == "__main__":
    main()
