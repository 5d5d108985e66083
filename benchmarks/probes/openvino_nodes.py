"""Where OpenVINO's time goes, node type by node type, beside npconvnext's split (bench_kernels.py).

    python benchmarks/probes/openvino_nodes.py [--threads 1] [--batch 1] [--precision f32|default]

convnext_tiny with seeded random weights, exported to ONNX as bench_engines.py does, compiled
with the benchmark's OpenVINO configuration ("openvino f32", or with --precision default the
precision left to OpenVINO) and PERF_COUNT; the per-node times of RUNS inferences, summed by
node type and kernel, whose names say the instructions used (`brgemm_avx512_amx_bf16`: AMX).
Run with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 it shows what bench_engines.py's "openvino
default, no AMX" runs. A one-off record for issues 15 and 29.
"""

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # benchmarks/, for engines
import engines  # noqa: E402

RUNS = 20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--precision", choices=("f32", "default"), default="f32")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        engines.prepare("convnext_tiny", directory)
        config = dict(engines.OPENVINO_CONFIG if args.precision == "f32" else engines.OPENVINO_DEFAULT_CONFIG,
                      PERF_COUNT=True)
        compiled, precision = engines.openvino(engines.files_of("convnext_tiny", directory)["onnx"], config,
                                               args.threads)
    request = compiled.create_infer_request()
    x = engines.images(args.batch)
    for _ in range(5):
        request.infer({0: x})
    spent = collections.Counter()
    start = time.perf_counter()
    for _ in range(RUNS):
        request.infer({0: x})
        for node in request.profiling_info:
            spent[f"{node.node_type} ({node.exec_type})"] += node.real_time.total_seconds() / RUNS
    print(f"OpenVINO convnext_tiny in {precision} (ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA')}), "
          f"{args.threads} thread(s), batch {args.batch}: "
          f"{(time.perf_counter() - start) / RUNS * 1e3:.1f} ms per inference (profiling on)")
    for kind, seconds in spent.most_common():
        if seconds >= 5e-5:
            print(f"  {kind:<50} {seconds * 1e3:7.2f} ms")
    print(f"  {'sum of the nodes':<50} {sum(spent.values()) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
