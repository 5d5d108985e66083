#!/usr/bin/env bash
# The benchmark sequence into one results folder: each step's output is appended to OUT/run.log
# under a "=== HH:MM:SS step" line, and the JSON of the parts that write it goes to OUT/.
#
#   benchmarks/run.sh OUT [--python PY] [--runtime-python PY] [--tf-python PY] [--steps LIST] [--no-header]
#
#   OUT               the results folder (created), e.g. benchmarks/results/2026-12-06-epyc-zen5-avx512
#   --python PY       the interpreter with the test and bench extras (default: python)
#   --runtime-python PY   one with `pip install -e .` only, as users install it: cold and memory
#                     start it (without it they start PY)
#   --tf-python PY    an interpreter with TensorFlow, for the load step's Keras and SavedModel files
#   --steps LIST      comma-separated, run in order (default: main,beside,cold,memory,split-1,split-2)
#   --no-header       skip the machine and version lines (a second invocation appending to a run);
#                     the commit line is printed always
#
# Steps:
#   main, beside, cold, memory   bench_engines.py's parts (threads 1,2; batches 1,8)
#   split-N                      bench_kernels.py at batch 1 with NPCONVNEXT_NUM_THREADS=N
#   split-bf16-N                 the same for the bfloat16 model (bench_kernels.py --dtype bfloat16)
#   split                        bench_kernels.py at batch 1, the default threads
#   train                        bench_train.py, batches 8,32 on 1 and 2 threads
#   train-default-wait           bench_train.py at batch 8 on 2 threads with OpenMP's default wait
#   train-split-N                bench_train.py --split at batch 8 on N threads
#   distributed                  bench_distributed.py over 1000 images
#   load                         bench_load.py
#   digits                       train_digits.py, 4 epochs on 1 thread
#   openvino-nodes-N             probes/openvino_nodes.py on N threads
#   openvino-bf16-nodes-N        the same in OpenVINO's default precision, as is and with oneDNN
#                                held below AMX (ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16)
#   bf16-accuracy                bf16_accuracy.py on every architecture
#   avx2-peers                   probes/avx2_probe.py peers, as is and with ONEDNN_MAX_CPU_ISA=AVX2
#   avx2-ours                    probes/avx2_probe.py ours (twice: cold, then warm) as on an AVX2 CPU
#   avx2-split-N                 split-N as on an AVX2 CPU (Numba told haswell without AVX-512)
#   STEP-again                   STEP once more, logged as STEP-again
# Runs from the repository's root (the folder above this script), on the checkout it sits in;
# a step that fails is logged and the next one runs, as in the runs recorded in results/.
set -uo pipefail

known() {
    case "${1%-again}" in
        main|beside|cold|memory|split|split-[0-9]*|split-bf16-[0-9]*|train|train-default-wait|train-split-[0-9]*|distributed|load|\
        digits|openvino-nodes-[0-9]*|openvino-bf16-nodes-[0-9]*|bf16-accuracy|\
        avx2-peers|avx2-ours|avx2-split-[0-9]*) return 0 ;;
        *) return 1 ;;
    esac
}

usage() { sed -n '2,/^# Runs from/p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || usage
OUT=$1
shift
PY=python
RUNTIME=""
TF=""
STEPS="main,beside,cold,memory,split-1,split-2"
HEADER=1
while [ $# -gt 0 ]; do
    case "$1" in
        --python) PY=$2; shift 2 ;;
        --runtime-python) RUNTIME=$2; shift 2 ;;
        --tf-python) TF=$2; shift 2 ;;
        --steps) STEPS=$2; shift 2 ;;
        --no-header) HEADER=0; shift ;;
        *) usage ;;
    esac
done
IFS=, read -r -a steps <<< "$STEPS"
for step in "${steps[@]}"; do
    known "$step" || { echo "run.sh: unknown step $step" >&2; exit 2; }
done
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/run.log") 2>&1

log() { echo "=== $(date -u +%H:%M:%S) $*"; }
runtime=()
[ -n "$RUNTIME" ] && runtime=(--runtime-python "$RUNTIME")
tf=()
[ -n "$TF" ] && tf=(--tf-python "$TF")
engines() { "$PY" benchmarks/bench_engines.py "$@"; }

# Numba compiling for an AVX2 CPU on this one: haswell, every AVX-512 (and newer) feature off;
# its own cache, so that the host's compiled kernels are neither used nor overwritten
avx2_env() {
    local features
    features=$("$PY" -c 'import llvmlite.binding as b; print(",".join(("-" if n.startswith(("avx512", "amx", "avxvnni", "avxifma", "avxneconvert")) or not on else "+") + n for n, on in b.get_host_cpu_features().items()))')
    echo "NUMBA_CPU_NAME=haswell NUMBA_CPU_FEATURES=$features NUMBA_CACHE_DIR=/tmp/npconvnext-avx2-jit"
}

run_step() {
    case "$1" in
        *-again) run_step "${1%-again}" ;;  # first: split-1-again would match split-[0-9]* below
        main)   engines --parts main --threads 1,2 --batches 1,8 --runs 9 --json "$OUT/main.json" ;;
        beside) engines --parts beside --threads 1,2 --batches 1,8 --runs 9 --rounds 3 --json "$OUT/beside.json" ;;
        cold)   engines --parts cold --rounds 3 "${runtime[@]}" --json "$OUT/cold.json" ;;
        memory) engines --parts memory "${runtime[@]}" --json "$OUT/memory.json" ;;
        split)  "$PY" benchmarks/bench_kernels.py --batch 1 ;;
        split-bf16-[0-9]*) NPCONVNEXT_NUM_THREADS=${1#split-bf16-} "$PY" benchmarks/bench_kernels.py --batch 1 --dtype bfloat16 ;;
        split-[0-9]*) NPCONVNEXT_NUM_THREADS=${1#split-} "$PY" benchmarks/bench_kernels.py --batch 1 ;;
        train)  "$PY" benchmarks/bench_train.py --batches 8,32 --threads 1,2 --rounds 2 ;;
        train-default-wait) "$PY" benchmarks/bench_train.py --batches 8 --threads 2 --rounds 2 --default-wait ;;
        train-split-[0-9]*) "$PY" benchmarks/bench_train.py --split --batches 8 --threads "${1#train-split-}" ;;
        distributed) "$PY" benchmarks/bench_distributed.py --images 1000 --json ;;
        load)   "$PY" benchmarks/bench_load.py "${tf[@]}" --json "$OUT/load.json" ;;
        digits) "$PY" benchmarks/train_digits.py --epochs 4 --threads 1 ;;
        openvino-nodes-[0-9]*) "$PY" benchmarks/probes/openvino_nodes.py --threads "${1#openvino-nodes-}" ;;
        openvino-bf16-nodes-[0-9]*)
            "$PY" benchmarks/probes/openvino_nodes.py --precision default --threads "${1#openvino-bf16-nodes-}"
            ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 "$PY" benchmarks/probes/openvino_nodes.py --precision default \
                --threads "${1#openvino-bf16-nodes-}" ;;
        bf16-accuracy) "$PY" benchmarks/bf16_accuracy.py --json "$OUT/bf16_accuracy.json" ;;
        avx2-peers) "$PY" benchmarks/probes/avx2_probe.py peers
                    ONEDNN_MAX_CPU_ISA=AVX2 "$PY" benchmarks/probes/avx2_probe.py peers ;;
        avx2-ours)  env $(avx2_env) "$PY" benchmarks/probes/avx2_probe.py ours
                    env $(avx2_env) "$PY" benchmarks/probes/avx2_probe.py ours ;;
        avx2-split-[0-9]*) env $(avx2_env) NPCONVNEXT_NUM_THREADS="${1#avx2-split-}" "$PY" benchmarks/bench_kernels.py --batch 1 ;;
    esac
}

if [ "$HEADER" = 1 ]; then
    lscpu | grep -E "Model name|^CPU\(s\)|CPU family|^Model:|cache|Hypervisor"
    grep -o -w -E "avx2|avx512f|avx512_bf16|amx_tile" /proc/cpuinfo | sort -u | tr '\n' ' '
    echo
    "$PY" - <<'VERSIONS'  # the versions the figures are of; a peer not installed is left out
from importlib import metadata
found = []
for name in ("numpy", "numba", "llvmlite", "torch", "timm", "onnxruntime", "openvino"):
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
print(" ".join(found))
VERSIONS
fi
# the commit every invocation ran at, -dirty with uncommitted changes
echo "npconvnext at $(git describe --always --dirty) ($(git log -1 --format=%s))"
for step in "${steps[@]}"; do
    log "$step"
    run_step "$step"
done
log done
