"""Where OpenVINO's time goes, node type by node type, beside npconvnext's split (bench_kernels.py).

    python benchmarks/probes/openvino_nodes.py [--threads 1] [--batch 1]

convnext_tiny with seeded random weights, exported to ONNX as bench_engines.py does, compiled
with the benchmark's OpenVINO configuration and PERF_COUNT; the per-node times of RUNS
inferences, summed by node type and kernel. A one-off record for issue 15.
"""

import argparse
import collections
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # benchmarks/, for bench_engines
import bench_engines  # noqa: E402

RUNS = 20


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    import openvino as ov

    with tempfile.TemporaryDirectory() as directory:
        bench_engines.prepare("convnext_tiny", directory)
        config = dict(bench_engines.OPENVINO_CONFIG, INFERENCE_NUM_THREADS=args.threads, PERF_COUNT=True)
        compiled = ov.Core().compile_model(bench_engines.files_of("convnext_tiny", directory)["onnx"], "CPU", config)
    request = compiled.create_infer_request()
    x = bench_engines.images(args.batch)
    for _ in range(5):
        request.infer({0: x})
    spent = collections.Counter()
    start = time.perf_counter()
    for _ in range(RUNS):
        request.infer({0: x})
        for node in request.profiling_info:
            spent[f"{node.node_type} ({node.exec_type})"] += node.real_time.total_seconds() / RUNS
    print(f"OpenVINO convnext_tiny, {args.threads} thread(s), batch {args.batch}: "
          f"{(time.perf_counter() - start) / RUNS * 1e3:.1f} ms per inference (profiling on)")
    for kind, seconds in spent.most_common():
        if seconds >= 5e-5:
            print(f"  {kind:<50} {seconds * 1e3:7.2f} ms")
    print(f"  {'sum of the nodes':<50} {sum(spent.values()) * 1e3:7.2f} ms")


if __name__ == "__main__":
    main()
