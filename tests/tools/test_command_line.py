"""The command line's habits: --version, --threads, --quiet, --dtype, defaults in --help, exit
statuses, progress bars that warnings do not break, `benchmark`, `evaluate` on any class names,
and one line per epoch from `finetune`."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

import npconvnext
from npconvnext.model import ConvNeXt
from npconvnext.params import random_state_dict
from npconvnext.train.finetune import write_weights

from tests.support import DATA

COMMANDS = ("classify", "features", "evaluate", "benchmark", "finetune", "summary", "download", "convert",
            "verify", "golden", "parity")


def npconvnext_command(*args, env=None):
    return subprocess.run([sys.executable, "-m", "npconvnext", *map(str, args)], capture_output=True, text=True,
                          env=None if env is None else dict(os.environ, **env), timeout=600)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "atto.safetensors"
    save_file(random_state_dict(npconvnext.get_config("convnext_atto")), path)
    return path


def test_version_and_every_commands_threads_quiet_and_defaults():
    done = npconvnext_command("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"npconvnext {npconvnext.__version__}"
    top = npconvnext_command("--help").stdout
    assert "benchmark" in top and "exit status:" in top and "  3    done, but some images" in top
    for command in COMMANDS:
        text = " ".join(npconvnext_command(command, "--help").stdout.split())
        assert "--threads N" in text and "-q, --quiet" in text, command
    classify = " ".join(npconvnext_command("classify", "--help").stdout.split())
    for shown in ("images per forward pass (default: 8)", "classes per image (default: 5)",
                  "--dtype {float32,float64,bfloat16}", "the model's precision (default: float32)", "exit status:"):
        assert shown in classify
    benchmark = " ".join(npconvnext_command("benchmark", "--help").stdout.split())
    assert "(default: 10.0)" in benchmark and "images per forward pass (default: 1)" in benchmark


def test_threads_are_taken_and_checked(weights):
    photo = os.path.join(DATA, "chelsea.png")
    code = ("import sys, numba; from npconvnext import cli; "
            "status = cli.main(sys.argv[1:]); print(status, numba.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code, "classify", photo, "--weights", str(weights), "--threads", "1"],
                          capture_output=True, text=True, env=dict(os.environ, NUMBA_NUM_THREADS="2"))
    assert done.stdout.splitlines()[-1] == "0 1", done.stderr
    done = npconvnext_command("classify", photo, "--weights", weights, "--threads", "99", env={"NUMBA_NUM_THREADS": "2"})
    assert done.returncode == 1 and done.stderr == "npconvnext classify: error: threads must be between 1 and 2, not 99\n"
    assert "must be at least 1, not 0" in npconvnext_command("classify", photo, "--threads", "0").stderr


def test_dtype_float64_runs_the_model_in_float64(weights, tmp_path):
    photo = os.path.join(DATA, "chelsea.png")
    row = json.loads(npconvnext_command("classify", photo, "--weights", weights, "--json", "--dtype", "float64",
                                        "--top-k", "3").stdout)
    model = npconvnext.create_model(None, weights=weights, dtype="float64")
    logits = model(npconvnext.preprocess(photo, model.data_config)[None].astype(np.float64))[0]
    assert row["indices"] == [int(i) for i in np.argsort(-logits)[:3]]
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    assert row["probabilities"] == [round(float(probabilities[i]), 6) for i in row["indices"]]
    done = npconvnext_command("features", photo, "--weights", weights, "--dtype", "float64", "-o", tmp_path / "e.npy")
    assert done.returncode == 0 and np.load(tmp_path / "e.npy").dtype == np.float64


def test_exit_status_and_one_json_object_per_input(weights, tmp_path):
    shutil.copy(os.path.join(DATA, "chelsea.png"), tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    missing = tmp_path / "gone" / "missing.png"
    done = npconvnext_command("classify", tmp_path / "chelsea.png", missing, tmp_path / "broken.jpg",
                              "--weights", weights, "--json", "--top-k", "1")
    assert done.returncode == 3, done.stderr  # done, but some inputs skipped
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["file"] for row in rows] == [str(tmp_path / n) for n in ("chelsea.png", "gone/missing.png", "broken.jpg")]
    assert rows[1] == {"file": str(missing), "error": f"{missing}: no such file or directory"}
    assert rows[2]["error"].startswith(f"{tmp_path / 'broken.jpg'}: cannot read image") and "labels" in rows[0]
    assert f"warning: skipped {missing}: no such file or directory" in done.stderr
    assert npconvnext_command("classify", tmp_path / "chelsea.png", "--weights", weights).returncode == 0
    done = npconvnext_command("features", tmp_path, missing, "--weights", weights, "-o", tmp_path / "e.npy")
    assert done.returncode == 3 and np.load(tmp_path / "e.npy").shape == (1, 320)
    assert npconvnext_command("classify", missing, "--weights", weights).returncode == 1  # nothing read
    assert npconvnext_command("classify", "--top-k", "0", missing).returncode == 2  # usage


def bar_and_notes(stderr):
    """The lines of stderr as a terminal shows them: each \\r starts the line again."""
    return [line.rsplit("\r", 1)[-1] for line in stderr.split("\n")]


def test_warnings_never_land_inside_a_progress_bar(weights, tmp_path):
    for i in range(6):
        shutil.copy(os.path.join(DATA, "chelsea.png"), tmp_path / f"{i}a.png")
        (tmp_path / f"{i}b.jpg").write_bytes(b"not a jpeg")
    done = npconvnext_command("classify", tmp_path, "--weights", weights, "--batch-size", "2",
                              env={"NPCONVNEXT_PROGRESS": "1"})
    assert done.returncode == 3
    assert re.search(r"classify: +\d+%.*\| *\d+/12", done.stderr), done.stderr  # tqdm's bar
    warnings = [line for line in done.stderr.split("\n") if "warning:" in line]
    assert len(warnings) == 6
    assert all(line.startswith("warning: skipped ") and "|" not in line for line in bar_and_notes("\n".join(warnings)))
    quiet = npconvnext_command("classify", tmp_path, "--weights", weights, "--quiet", env={"NPCONVNEXT_PROGRESS": "1"})
    assert "12/12" not in quiet.stderr and quiet.stderr.count("warning: skipped") == 6
    assert quiet.stdout == done.stdout


def test_benchmark_reports_latency_and_throughput(weights):
    done = npconvnext_command("benchmark", "--weights", weights, "--seconds", "0.2", "--input-size", "32",
                              "--batch-size", "2", "--json", "--threads", "1")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["model"] == "convnext_atto" and result["dtype"] == "float32" and result["threads"] == 1
    assert result["batch_size"] == 2 and result["input_size"] == [32, 32] and result["iterations"] >= 3
    assert result["min_ms"] <= result["median_ms"] <= result["p90_ms"]
    assert result["images_per_s"] == pytest.approx(2 * result["iterations"] / result["seconds"], rel=1e-3)
    text = npconvnext_command("benchmark", "--model", "convnext_atto", "--random-weights", "--seconds", "0.1",
                              "--input-size", "32", "--dtype", "float64").stdout
    assert text.startswith("convnext_atto (random weights: timing only), float64, batch 1 of 32x32")
    assert "latency per batch: median" in text and "images/s" in text
    done = npconvnext_command("benchmark", "--weights", weights, "--random-weights")
    assert done.returncode == 1 and "give --weights or --random-weights, not both" in done.stderr


def test_benchmark_offline_without_weights_points_to_random_weights(tmp_path):
    # a newcomer's first `npconvnext benchmark` on a machine without the hub or its cache
    done = npconvnext_command("benchmark", "--seconds", "0.1", env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert line.startswith("npconvnext benchmark: error: cannot get convnext_tiny.fb_in1k")
    assert line.endswith("To time the architecture alone, without its weights: --random-weights")


def test_evaluate_a_fine_tuned_file_on_its_own_class_names(tmp_path):
    config = npconvnext.get_config("convnext_atto", num_classes=3)
    model = ConvNeXt(config, random_state_dict(config, seed=4))
    data = npconvnext.DataConfig(input_size=(64, 64), crop_pct=1.0, crop_mode="squash")
    path = tmp_path / "pets.safetensors"
    write_weights(str(path), model, ("cat", "dog", "fish"), data)
    photos = {"cat": ["chelsea.png", "coffee.png"], "dog": ["rocket.jpg"]}
    top1 = {}
    for label, names in photos.items():
        (tmp_path / "val" / label).mkdir(parents=True)
        for name in names:
            shutil.copy(os.path.join(DATA, name), tmp_path / "val" / label)
            top1[name] = int(model(npconvnext.preprocess(os.path.join(DATA, name), data)[None]).argmax())
    done = npconvnext_command("evaluate", tmp_path / "val", "--weights", path, "--report", tmp_path / "r.json")
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["model"] == "convnext_atto" and report["weights"] == str(path) and report["images"] == 3
    hits = {"cat": sum(top1[n] == 0 for n in photos["cat"]), "dog": int(top1["rocket.jpg"] == 1)}
    assert report["top1"] == round(100 * (hits["cat"] + hits["dog"]) / 3, 3) and report["top5"] == 100.0
    assert [(r["class"], r["index"], r["images"], r["top1"]) for r in report["per_class"]] == [
        ("cat", 0, 2, round(100 * hits["cat"] / 2, 3)), ("dog", 1, 1, 100.0 * hits["dog"])]
    labels = sorted({0, 1} | set(top1.values()))
    assert report["confusion"]["indices"] == labels
    assert report["confusion"]["labels"] == [("cat", "dog", "fish")[i] for i in labels]
    expected = np.zeros((len(labels), len(labels)), int)
    for label, names in photos.items():
        for name in names:
            expected[labels.index(("cat", "dog").index(label)), labels.index(top1[name])] += 1
    assert report["confusion"]["matrix"] == expected.tolist()
    assert re.search(r"^cat +2 +[\d.]+ +100\.00$", done.stdout, re.M), done.stdout  # the per-class table
    (tmp_path / "val" / "horse").mkdir()
    done = npconvnext_command("evaluate", tmp_path / "val", "--weights", path)
    assert done.returncode == 1
    assert f"{tmp_path / 'val' / 'horse'}: folder name is not one of the model's class names (cat, dog, fish)" \
        in done.stderr


def image_folders(root):
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / label / f"{i}.png")


def test_finetune_prints_one_line_per_epoch(tmp_path):
    image_folders(tmp_path / "data")
    done = npconvnext_command("finetune", tmp_path / "data", "--model", "convnext_atto", "--epochs", "2",
                              "--img-size", "32", "--batch-size", "4", "-o", tmp_path / "out.safetensors",
                              env={"NPCONVNEXT_PROGRESS": "1"})
    assert done.returncode == 0, done.stderr
    epochs = [line for line in done.stdout.splitlines() if line.startswith("epoch")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1", "epoch 2"]
    assert not any(line.startswith("epoch 1:") for line in bar_and_notes(done.stderr))  # not twice
    # no --weights or --pretrained: said, as `--model convnext_atto` alone reads like pretrained weights
    assert "npconvnext: training convnext_atto from scratch (timm's init)" in done.stderr
    assert re.fullmatch(r"epoch 2: loss [\d.]+, validation top-1 [\d.]+ %, [\d.]+ images/s, checkpoint .*", epochs[1])


def test_finetune_from_python_logs_one_line_per_epoch(tmp_path, caplog, capsys):
    from npconvnext.train.finetune import Recipe, finetune

    image_folders(tmp_path / "data")
    recipe = Recipe(epochs=2, batch_size=4, img_size=32, val_split=0.25)
    with caplog.at_level("INFO", logger="npconvnext"):
        finetune(str(tmp_path / "data"), str(tmp_path / "out.safetensors"), "convnext_atto", recipe=recipe)
    lines = [r.getMessage() for r in caplog.records if r.name == "npconvnext.train.finetune"]
    assert [line.split(":")[0] for line in lines] == ["epoch 1", "epoch 2"]
    assert capsys.readouterr() == ("", "")  # no bar where stderr is no terminal, and nothing printed
