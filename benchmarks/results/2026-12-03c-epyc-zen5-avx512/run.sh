#!/usr/bin/env bash
# the benchmark sequence, from /work/main with /tmp/venv (the test and bench extras) and
# /tmp/venv-rt (`pip install -e .` only: the runtime dependencies, as users install it);
# the evening run of 2026-12-03, after the micro-kernel's weight prefetch
cd /work/main
PY=/tmp/venv/bin/python
OUT=benchmarks/results/2026-12-03c-epyc-zen5-avx512
log() { echo "=== $(date -u +%H:%M:%S) $*" ; }
{ lscpu | grep -E "Model name|^CPU\(s\)|CPU family|^Model:"; grep -o -w -E "avx2|avx512f|avx512_bf16|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' '; echo; git log --oneline | head -1; }
log main;   $PY benchmarks/bench_engines.py --parts main --threads 1,2 --batches 1,8 --runs 9 --json $OUT/main.json
log beside; $PY benchmarks/bench_engines.py --parts beside --threads 1,2 --batches 1,8 --runs 9 --rounds 3 --json $OUT/beside.json
log cold;   $PY benchmarks/bench_engines.py --parts cold --rounds 3 --runtime-python /tmp/venv-rt/bin/python --json $OUT/cold.json
log memory; $PY benchmarks/bench_engines.py --parts memory --runtime-python /tmp/venv-rt/bin/python --json $OUT/memory.json
log split-1; NPCONVNEXT_NUM_THREADS=1 $PY benchmarks/bench_kernels.py --batch 1
log split-2; NPCONVNEXT_NUM_THREADS=2 $PY benchmarks/bench_kernels.py --batch 1
log done
