"""Jobs on a real Dask cluster (npconvnext/distributed): two local worker processes, shared by
the module's tests, against the single-process command on the same images."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("distributed", reason="the Dask tests need dask[distributed] (the `test` extra)")

from distributed import Client, WorkerPlugin  # noqa: E402
from distributed.comm.core import CommClosedError  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

import npconvnext  # noqa: E402
from npconvnext import cli  # noqa: E402
from npconvnext.batch import fetched  # noqa: E402
from npconvnext.distributed import Job, ModelSpec, cluster, jobs, list_images, run, worker  # noqa: E402
from npconvnext.errors import ImageError, InputError, NpConvNeXtError  # noqa: E402
from npconvnext.params import random_state_dict  # noqa: E402

from tests.support import DATA  # noqa: E402
SIZE = "64"  # a small input size keeps the forwards cheap


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "atto.safetensors"
    save_file(random_state_dict(npconvnext.get_config("convnext_atto"), seed=3), path)
    return str(path)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The shipped photos, nine generated images of assorted sizes and modes, and a broken file."""
    folder = tmp_path_factory.mktemp("images")
    for name in os.listdir(DATA):
        if name.endswith((".png", ".jpg")):
            shutil.copy(os.path.join(DATA, name), folder)
    rng = np.random.default_rng(0)
    for i in range(9):
        h, w = rng.integers(24, 160, size=2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels).convert("L" if i % 3 == 0 else "RGB")
        image.save(folder / f"gen{i}.{'png' if i % 2 else 'jpg'}")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return str(folder)


@pytest.fixture(scope="module")
def client():
    with cluster.local_cluster(2, threads_per_worker=1) as local, Client(local) as c:
        yield c


def rows_of(output):
    parts = sorted(glob.glob(os.path.join(output, "part-*.jsonl")))
    return [json.loads(line) for part in parts for line in open(part)]


def single_process_rows(capsys, *args):
    """The rows of `classify --json` in this process; the images hold a broken file: status 3."""
    assert cli.main(["classify", *map(str, args), "--json", "--input-size", SIZE]) == cli.EXIT_SKIPPED
    out, err = capsys.readouterr()
    return [json.loads(line) for line in out.splitlines()], err


def test_workers_run_this_checkout_with_their_share_of_the_cores(client, weights, images, tmp_path):
    assert set(client.run(lambda: npconvnext.__file__).values()) == {npconvnext.__file__}
    job = Job("classify", ModelSpec(weights=weights, input_size=64))
    run(client, list_images([images]), str(tmp_path / "out"), job)
    expected = min(max(1, cluster.available_cores() // 2), int(os.environ["NUMBA_NUM_THREADS"]))
    assert set(client.run(lambda: worker.task_threads()).values()) == {expected}


def test_classify_on_the_cluster_equals_the_single_process_command(client, weights, images, tmp_path, capsys):
    expected, warnings = single_process_rows(capsys, images, "--weights", weights, "--top-k", "3")
    broken = os.path.join(images, "broken.jpg")
    assert f"warning: skipped {broken}: cannot read image" in warnings
    out = tmp_path / "out"
    assert cli.main(["classify", images, "--weights", weights, "--top-k", "3", "--input-size", SIZE, "--json",
                     "--scheduler", client.scheduler.address, "--output", str(out),
                     "--partition-size", "4", "--batch-size", "3"]) == cli.EXIT_SKIPPED
    assert "13 images in 4 partitions" in capsys.readouterr().out
    rows = rows_of(out)
    assert [r["file"] for r in rows] == list_images([images])  # every image, once, in input order
    failed = [r for r in rows if "error" in r]
    assert [r["file"] for r in failed] == [broken] and failed[0]["error"].startswith(f"{broken}: cannot read image")
    assert [r for r in expected if "error" in r] == failed  # one object per input in both modes, errors too
    classified = [r for r in rows if "error" not in r]
    expected = [r for r in expected if "error" not in r]
    assert [(r["file"], r["labels"], r["indices"]) for r in classified] == \
        [(r["file"], r["labels"], r["indices"]) for r in expected]
    np.testing.assert_allclose([r["probabilities"] for r in classified], [r["probabilities"] for r in expected],
                               rtol=0, atol=2e-6)  # the 6-decimal rounding may differ by one place
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"] == "classify" and manifest["images"] == 13 and manifest["weights"] == weights


def test_features_on_the_cluster_equal_the_single_process_command(client, weights, images, tmp_path, capsys):
    single = tmp_path / "emb.npy"
    assert cli.main(["features", images, "--weights", weights, "--input-size", SIZE, "-o", str(single)]) == 3
    out = tmp_path / "out"
    assert cli.main(["features", images, "--weights", weights, "--input-size", SIZE, "-o", str(out),
                     "--scheduler", client.scheduler.address, "--partition-size", "5"]) == 3
    shards = sorted(glob.glob(str(out / "part-*.npy")))
    embeddings = np.concatenate([np.load(s) for s in shards])
    expected = np.load(single)
    assert embeddings.dtype == expected.dtype == np.float32 and embeddings.shape == expected.shape == (12, 320)
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    files = b"".join(open(s[:-len(".npy")] + ".files.txt", "rb").read() for s in shards)
    assert files == (tmp_path / "emb.files.txt").read_bytes()
    for shard in shards:  # each partition's rows point into its own shard, in order
        rows = [json.loads(line) for line in open(shard[:-len(".npy")] + ".jsonl")]
        assert [r["row"] for r in rows if "row" in r] == list(range(len(np.load(shard))))
    assert [r["file"] for r in rows_of(out) if "error" in r] == [os.path.join(images, "broken.jpg")]


class KillOnce(WorkerPlugin):
    """Kills the first worker that starts a partition, once (a marker file remembers)."""

    def __init__(self, marker):
        self.marker = marker

    def transition(self, key, start, finish, **kwargs):
        if finish == "executing" and "npconvnext-part" in str(key) and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGKILL)).start()  # while the task runs


def test_a_worker_killed_mid_run_loses_no_result_and_duplicates_none(client, weights, images, tmp_path):
    job = Job("classify", ModelSpec(weights=weights, input_size=64), partition_size=2, batch_size=2)
    paths = list_images([images])
    expected = tmp_path / "expected"
    run(None, paths, str(expected), job)  # in this process
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce(str(marker)), name="kill-once")
    try:
        summary = run(client, paths, str(tmp_path / "out"), job)
    finally:
        client.wait_for_workers(2, timeout=60)  # the nanny restarts the killed one
        try:
            client.unregister_worker_plugin("kill-once")
        except CommClosedError:  # the broadcast can still meet the killed worker's closed stream;
            pass                 # the plugin is spent anyway: its marker exists
    assert marker.exists(), "no worker was killed"
    assert (summary.images, summary.failed, summary.partitions) == (13, 1, 7)
    assert [r["file"] for r in rows_of(tmp_path / "out")] == paths
    assert [r.get("indices") for r in rows_of(tmp_path / "out")] == [r.get("indices") for r in rows_of(expected)]


def test_a_rerun_computes_only_unfinished_partitions(client, weights, images, tmp_path):
    job = Job("classify", ModelSpec(weights=weights, input_size=64), partition_size=4)
    paths = list_images([images])
    out = tmp_path / "out"
    first = run(client, paths, str(out), job)
    assert (first.computed, first.skipped) == (4, 0)
    finished = {p: (os.stat(p).st_mtime_ns, open(p).read()) for p in glob.glob(str(out / "part-*.jsonl"))}
    lost = str(out / "part-00002.jsonl")
    os.unlink(lost)  # as if the run had died while partition 2 ran
    again = run(client, paths, str(out), job)
    assert (again.computed, again.skipped, again.images, again.failed) == (1, 3, 13, 1)
    for path, (mtime, text) in finished.items():
        assert open(path).read() == text
        assert (os.stat(path).st_mtime_ns == mtime) == (path != lost), path  # only the lost one rewritten
    # a task sent for a finished partition (a retry after its worker died) does not run it again
    result = jobs.run_partition(0, paths[:4], job, str(out))
    first_part = str(out / "part-00000.jsonl")
    assert not result.computed and os.stat(first_part).st_mtime_ns == finished[first_part][0]


def test_a_partition_that_fails_as_a_whole_is_reported_and_the_job_goes_on(client, weights, images, tmp_path):
    job = Job("classify", ModelSpec("convnext_tiny", weights, input_size=64), partition_size=8)  # atto's weights
    with pytest.raises(NpConvNeXtError, match=r"2 of 2 partitions failed \(first part-00000: CheckpointError: "):
        run(client, list_images([images]), str(tmp_path / "out"), job)
    assert not glob.glob(str(tmp_path / "out" / "part-*"))


def test_another_job_over_the_same_output_is_refused(weights, images, tmp_path):
    paths = list_images([images])
    out = str(tmp_path / "out")
    job = Job("classify", ModelSpec(weights=weights, input_size=64), partition_size=8)
    run(None, paths[:2], out, job)
    with pytest.raises(InputError, match=r"holds another job \(top_k 5 there, 3 now\)"):
        run(None, paths[:2], out, Job("classify", job.spec, top_k=3, partition_size=8))
    with pytest.raises(InputError, match="images 2 there, 3 now; inputs_sha256"):
        run(None, paths[:3], out, job)
    os.unlink(os.path.join(out, "manifest.json"))
    with pytest.raises(InputError, match="is not empty and has no manifest.json"):
        run(None, paths[:2], out, job)


def test_classify_output_in_one_process_and_command_errors(weights, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["classify", images, "--weights", weights, "--input-size", SIZE, "--output", str(out)]
    assert cli.main(args) == 3  # --output without --scheduler: the same job, in this process; one skipped
    assert len(rows_of(out)) == 13
    assert cli.main(args) == 3 and "(0 run now, 1 finished before)" in capsys.readouterr().out
    assert cli.main(["features", images, "--weights", weights, "-o", str(out), "--scheduler", "local:0"]) == 1
    assert "local:N needs a whole number of workers N >= 1" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"no")
    assert cli.main(["classify", str(tmp_path / "bad"), "--weights", weights, "--output", str(tmp_path / "o2")]) == 1
    assert "none of the 1 images could be read" in capsys.readouterr().err
    # a missing file is skipped as an unreadable one is, in this mode as in the others: status 3
    missing = str(tmp_path / "missing.png")
    shutil.copy(os.path.join(DATA, "chelsea.png"), tmp_path / "bad")
    assert cli.main(["classify", str(tmp_path / "bad"), missing, "--weights", weights, "--input-size", SIZE,
                     "--output", str(tmp_path / "o3")]) == cli.EXIT_SKIPPED
    first, broken, absent = [r.get("error") for r in rows_of(tmp_path / "o3")]
    assert first is None and broken.startswith(f"{tmp_path / 'bad' / 'x.jpg'}: cannot read image")
    assert absent == f"{missing}: no such file or directory"


def test_the_command_starts_its_own_local_cluster(weights, images, tmp_path):
    """local:1 on a machine of C cores: one worker of C task threads sharing one model."""
    single = tmp_path / "emb.npy"
    assert cli.main(["features", images, "--weights", weights, "--input-size", SIZE, "-o", str(single)]) == 3
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "npconvnext", "features", images, "--weights", weights,
                           "--input-size", SIZE, "--scheduler", "local:1", "-o", str(out), "--partition-size", "3"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr  # broken.jpg: skipped, its row holds the error
    assert "13 images in 5 partitions" in done.stdout and "Traceback" not in done.stderr
    embeddings = np.concatenate([np.load(p) for p in sorted(glob.glob(str(out / "part-*.npy")))])
    expected = np.load(single)
    np.testing.assert_allclose(embeddings, expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def test_inputs_from_globs_and_urls(images, tmp_path):
    pngs = sorted(glob.glob(os.path.join(images, "*.png")))
    assert list_images([os.path.join(images, "*.png")]) == pngs
    assert list_images(["file://" + images]) == list_images([images])  # local URLs become paths
    with pytest.raises(InputError, match="no file matches"):
        list_images([os.path.join(images, "*.tiff")])
    with fetched("file://" + pngs[0]) as local:  # the copy an s3:// or http:// image is read from
        assert open(local, "rb").read() == open(pngs[0], "rb").read()
    assert not os.path.exists(local)
    with pytest.raises(ImageError, match="larger than 100 bytes"), fetched("file://" + pngs[0], limit=100):
        pass
    with pytest.raises(ImageError, match="no such file"), fetched("file://" + images + "/missing.png"):
        pass


def test_a_job_from_python_reports_through_the_logger_and_the_command_prints_it_once(weights, images, tmp_path,
                                                                                      caplog, capsys):
    job = Job("classify", ModelSpec(weights=weights, input_size=64), partition_size=8)
    with caplog.at_level("INFO", logger="npconvnext"):
        summary = run(None, list_images([images]), str(tmp_path / "out"), job)
    (record,) = [r for r in caplog.records if r.name == "npconvnext.distributed.jobs"]
    assert record.getMessage() == (f"classify: 13 images in 2 partitions -> {summary.output} (2 run now, "
                                   "0 finished before); 1 could not be read")
    args = ["classify", images, "--weights", weights, "--input-size", SIZE, "--output", str(tmp_path / "o2")]
    assert cli.main(args) == cli.EXIT_SKIPPED
    out, err = capsys.readouterr()
    assert out.count("13 images in 1 partitions") == 1 and "13 images in" not in err
