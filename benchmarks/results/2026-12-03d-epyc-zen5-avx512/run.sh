#!/usr/bin/env bash
# the benchmark sequence, from /work/main with /tmp/venv (the test and bench extras) and
# /tmp/venv-rt (`pip install -e .` only: the runtime dependencies, as users install it);
# the late run of 2026-12-03, after the faster panel packing; then our AVX2 code on
# this AVX-512 CPU, and whether the peers can be held to AVX2 here (avx2_probe.py)
cd /work/main
PY=/tmp/venv/bin/python
OUT=benchmarks/results/2026-12-03d-epyc-zen5-avx512
log() { echo "=== $(date -u +%H:%M:%S) $*" ; }
{ lscpu | grep -E "Model name|^CPU\(s\)|CPU family|^Model:"; grep -o -w -E "avx2|avx512f|avx512_bf16|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' '; echo; git log --oneline | head -1; }
log main;   $PY benchmarks/bench_engines.py --parts main --threads 1,2 --batches 1,8 --runs 9 --json $OUT/main.json
log beside; $PY benchmarks/bench_engines.py --parts beside --threads 1,2 --batches 1,8 --runs 9 --rounds 3 --json $OUT/beside.json
log cold;   $PY benchmarks/bench_engines.py --parts cold --rounds 3 --runtime-python /tmp/venv-rt/bin/python --json $OUT/cold.json
log memory; $PY benchmarks/bench_engines.py --parts memory --runtime-python /tmp/venv-rt/bin/python --json $OUT/memory.json
log split-1; NPCONVNEXT_NUM_THREADS=1 $PY benchmarks/bench_kernels.py --batch 1
log split-2; NPCONVNEXT_NUM_THREADS=2 $PY benchmarks/bench_kernels.py --batch 1
log openvino-nodes-1; $PY $OUT/openvino_nodes.py --threads 1
AVX2="NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=$($PY -c 'import llvmlite.binding as b; print(",".join(("-" if n.startswith(("avx512", "amx", "avxvnni", "avxifma", "avxneconvert")) or not on else "+") + n for n, on in b.get_host_cpu_features().items()))') NUMBA_CACHE_DIR=/tmp/npconvnext-avx2-jit"
log avx2-peers; $PY $OUT/avx2_probe.py peers; ONEDNN_MAX_CPU_ISA=AVX2 $PY $OUT/avx2_probe.py peers
log avx2-ours;  env $AVX2 $PY $OUT/avx2_probe.py ours; env $AVX2 $PY $OUT/avx2_probe.py ours
log avx2-split-1; env $AVX2 NPCONVNEXT_NUM_THREADS=1 $PY benchmarks/bench_kernels.py --batch 1
log done
