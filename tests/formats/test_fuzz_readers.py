"""Bounded fuzzing campaigns against the weight readers, run on every CI build.

scripts/fuzz_readers.py mutates real safetensors and torch.save files (bytes, JSON header,
pickle opcodes, zip entries), OpenVINO IRs (graph edits, .bin truncations and flips) and
TensorFlow SavedModels (index edits with valid checksums, shard damage, lost files) and Keras
files (.h5, .weights.h5, .keras: HDF5 bytes and structure, zip members rebuilt), and reads
each in a worker process with a time and memory limit, so a segfault or a hang is counted
instead of killing pytest. The campaigns are seeded: a failure here reproduces with
`python scripts/fuzz_readers.py N --seed S [--kinds ...]`.
"""

import json
import os
import subprocess
import sys
from tests.support import ROOT, STARTING_ENVIRON

SCRIPT = os.path.join(ROOT, "scripts", "fuzz_readers.py")
INPUTS, SEED = 8000, 20261124
MAX_GROWTH_MB = 200   # peak RSS over the worker's after importing npconvnext; the seeds are a few kB
MAX_SECONDS = 2.0     # per input; each is a few kB


def test_mutated_weight_files_fail_cleanly_in_bounded_time_and_memory():
    out = subprocess.run([sys.executable, SCRIPT, str(INPUTS), "--seed", str(SEED), "--timeout", "20", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["crashes"] == [] and summary["hangs"] == [], summary
    assert set(summary["outcomes"]) <= {"loaded", "CheckpointError"}, summary["others"]
    assert summary["unnamed_count"] == 0, summary["unnamed"]
    assert summary["memory"] == [], summary["memory"]
    assert summary["peak_rss_mb"] - summary["baseline_rss_mb"] < MAX_GROWTH_MB, summary
    assert summary["slowest_seconds"] < MAX_SECONDS, summary
    # the campaign reached both readers and both verdicts, so the checks above had something to see
    assert min(summary["by_kind"].values()) > INPUTS // 4 and len(summary["by_kind"]) == 2, summary["by_kind"]
    assert summary["outcomes"].get("loaded", 0) > INPUTS // 50 and summary["outcomes"]["CheckpointError"] > INPUTS // 2


IR_INPUTS, IR_SEED = 240, 20261206
IR_MAX_SECONDS = 20.0  # per input: a bound that catches quadratic work, not a speed target (an IR of atto, a few MB)


def test_mutated_irs_and_saved_models_fail_cleanly_in_bounded_time_and_memory():
    out = subprocess.run([sys.executable, SCRIPT, str(IR_INPUTS), "--seed", str(IR_SEED), "--timeout", "30",
                          "--kinds", "ir,savedmodel", "--json"], capture_output=True, text=True, timeout=1200,
                         env=dict(STARTING_ENVIRON))  # not what in-process OpenVINO/Keras added
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["crashes"] == [] and summary["hangs"] == [], summary
    assert summary["silent"] == [], summary  # a graph edit that loads gives the seed's weights and convention
    assert set(summary["outcomes"]) <= {"loaded", "CheckpointError"}, summary["others"]
    assert summary["unnamed_count"] == 0, summary["unnamed"]
    assert summary["memory"] == [], summary["memory"]
    assert summary["peak_rss_mb"] - summary["baseline_rss_mb"] < MAX_GROWTH_MB, summary
    assert summary["slowest_seconds"] < IR_MAX_SECONDS, summary
    # both formats were reached, and the IR seeds load clean, so a silent change could show
    assert min(summary["by_kind"].values()) > IR_INPUTS // 4 and len(summary["by_kind"]) == 2, summary["by_kind"]
    assert summary["clean_seeds_loaded"] >= 2 and summary["outcomes"].get("loaded", 0) > 0, summary


KERAS_INPUTS, KERAS_SEED = 36, 20261206
KERAS_MAX_SECONDS = 10.0  # per input: a bound that catches quadratic work, not a speed target (14 MB files)


def test_mutated_keras_files_fail_cleanly_in_bounded_time_and_memory():
    # the seeds: Keras' three files of two small ConvNeXts, written by Keras on torch in a subprocess
    out = subprocess.run([sys.executable, SCRIPT, str(KERAS_INPUTS), "--seed", str(KERAS_SEED), "--timeout", "30",
                          "--kinds", "h5,weights.h5,keras", "--json"], capture_output=True, text=True, timeout=600,
                         env=dict(STARTING_ENVIRON))
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["crashes"] == [] and summary["hangs"] == [], summary
    assert summary["silent"] == [], summary  # an edit that keeps the file's meaning loads as the seed, or is refused
    assert set(summary["outcomes"]) <= {"loaded", "CheckpointError"}, summary["others"]
    assert summary["unnamed_count"] == 0, summary["unnamed"]
    assert summary["memory"] == [], summary["memory"]
    assert summary["peak_rss_mb"] - summary["baseline_rss_mb"] < MAX_GROWTH_MB, summary
    assert summary["slowest_seconds"] < KERAS_MAX_SECONDS, summary
    # the three containers were reached, both verdicts seen, and clean seeds loaded to compare with
    assert min(summary["by_kind"].values()) >= KERAS_INPUTS // 6 and len(summary["by_kind"]) == 3, summary["by_kind"]
    assert summary["clean_seeds_loaded"] >= 2 and summary["outcomes"].get("loaded", 0) > 0, summary
    assert summary["outcomes"].get("CheckpointError", 0) > 0, summary
