"""Resident memory after each step of a cold start: python rss_by_phase.py WEIGHTS.safetensors
(run with the runtime-only interpreter, JIT cache warm). VmRSS, RssAnon and RssFile in MB;
recorded in results/2026-12-03b-epyc-zen5-avx512/rss_by_phase.log."""
import sys


def rss():
    with open("/proc/self/status") as status:
        return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in status
                if line.startswith(("VmRSS", "RssAnon", "RssFile"))}


steps = [("start", rss())]
import numpy as np  # noqa: E402
steps.append(("import numpy", rss()))
import numba  # noqa: E402,F401
steps.append(("import numba", rss()))
import npconvnext  # noqa: E402
steps.append(("import npconvnext", rss()))
net = npconvnext.create_model("convnext_tiny", weights=sys.argv[1])
steps.append(("load the weights", rss()))
net(np.zeros((1, 3, 224, 224), np.float32))
steps.append(("first forward", rss()))
for name, sizes in steps:
    print(f"{name:<20} " + "  ".join(f"{k} {v}" for k, v in sizes.items()))
