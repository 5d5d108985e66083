#!/usr/bin/env bash
# the quiet-machine benchmark sequence, from /work/main with /tmp/venv
cd /work/main
PY=/tmp/venv/bin/python
log() { echo "=== $(date -u +%H:%M:%S) $*" ; }
{ lscpu | grep -E "Model name|^CPU\(s\)"; grep -o -w -E "avx2|avx512f|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' '; echo; git log --oneline | head -1; } 
log main;   $PY benchmarks/bench_engines.py --parts main --threads 1,2 --batches 1,8 --runs 9 --json /tmp/bench/main.json
log beside; $PY benchmarks/bench_engines.py --parts beside --threads 1,2 --batches 1,8 --runs 9 --rounds 3 --json /tmp/bench/beside.json
log cold;   $PY benchmarks/bench_engines.py --parts cold --rounds 3 --json /tmp/bench/cold.json
log train;  $PY benchmarks/bench_train.py --batches 8,32 --threads 1,2 --rounds 2
log train-default-wait; $PY benchmarks/bench_train.py --batches 8 --threads 2 --rounds 2 --default-wait
log distributed; $PY benchmarks/bench_distributed.py --images 1000 --json
log load;   $PY benchmarks/bench_load.py --tf-python /tmp/venv-tf/bin/python --json /tmp/bench/load.json
log memory; $PY benchmarks/bench_engines.py --parts memory --json /tmp/bench/memory.json
log done
# afterwards: where the time goes (forward at 1 and 2 threads, training step), and the digits run
NPCONVNEXT_NUM_THREADS=1 $PY benchmarks/bench_kernels.py --batch 1
$PY benchmarks/bench_kernels.py --batch 1
$PY benchmarks/bench_train.py --split --batches 8 --threads 1
$PY benchmarks/bench_train.py --split --batches 8 --threads 2
$PY benchmarks/train_digits.py --epochs 4 --threads 1
