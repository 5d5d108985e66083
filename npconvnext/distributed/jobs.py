"""A classify or features job over many images, cut into partitions written as they finish.

The output directory (OUT) every worker and the client reach at the same path:

    OUT/manifest.json         the job: task, model, weights (and their sha256), dtype, input
                              size, top-k, partition size, number of images and a hash of their list
    OUT/part-00000.jsonl      one JSON object per image of partition 0, in input order:
                              classify: {"file", "labels", "indices", "probabilities"}
                              features: {"file", "row"} (its row in part-00000.npy)
                              either:   {"file", "error"} for an image that could not be read
    OUT/part-00000.npy        features only: (n, D) embeddings (the model's dtype) of the images read
    OUT/part-00000.files.txt  features only: their file names' exact bytes, one a line (as
                              `npconvnext features -o` writes beside its .npy)

Every file is written atomically (atomic.py), the .jsonl last: a partition is finished exactly
when its .jsonl exists, so a crash loses at most the partitions in flight, and a rerun over the
same OUT computes only the partitions without one (a task run twice, as Dask does after a
worker dies, writes the same bytes again). A rerun of a different job over the same OUT is
refused before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numba
import numpy as np

from .. import progress as progress_bars
from ..atomic import atomic_write
from ..batch import ModelSpec, classified_row, classify, describe, embed, read_batch, shown
from ..errors import InputError, NpConvNeXtError
from ..formats import sha256_of
from .worker import task_threads, worker_model

TASKS = ("classify", "features")
MANIFEST = "manifest.json"
FORMAT = 1  # of the output directory; a reader refuses others
DEFAULT_PARTITION_SIZE = 256
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Job:
    task: str                       # "classify" or "features"
    spec: ModelSpec = field(default_factory=ModelSpec)
    top_k: int = 5                  # classify: classes per image
    batch_size: int = 8             # images per forward pass
    partition_size: int = DEFAULT_PARTITION_SIZE  # images per task and per output file

    def __post_init__(self):
        if self.task not in TASKS:
            raise InputError(f"task must be one of {TASKS}, not {self.task!r}")
        for name in ("top_k", "batch_size", "partition_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, not {getattr(self, name)}")


@dataclass(frozen=True)
class PartitionResult:
    index: int
    images: int
    failed: int      # images recorded with an error
    computed: bool   # False: it was finished already and was not run again


@dataclass(frozen=True)
class Summary:
    output: str
    images: int
    failed: int
    partitions: int
    computed: int    # partitions run now
    skipped: int     # partitions finished by an earlier run


def part_name(index: int) -> str:
    return f"part-{index:05d}"


def partitions(paths: list[str], size: int) -> list[list[str]]:
    return [paths[start:start + size] for start in range(0, len(paths), size)]


# ---- the manifest ------------------------------------------------------------------------------

def job_record(job: Job, paths: list[str]) -> dict:
    """What the manifest records: everything that decides the output's content."""
    inputs = hashlib.sha256(b"".join(os.fsencode(p) + b"\n" for p in paths)).hexdigest()
    spec = job.spec
    return {"format": FORMAT, "task": job.task, "model": spec.model, "weights": spec.weights,
            "weights_sha256": sha256_of(spec.weights) if spec.weights else None,
            "dtype": spec.dtype, "input_size": spec.input_size,
            "top_k": job.top_k if job.task == "classify" else None,
            "partition_size": job.partition_size, "images": len(paths), "inputs_sha256": inputs}


def open_output(output: str, job: Job, paths: list[str]) -> None:
    """Make OUT ready for `job`: a new or empty directory gets the manifest; one holding the
    same job is resumed; anything else is refused (InputError) before a byte is written."""
    record = job_record(job, paths)
    manifest = os.path.join(output, MANIFEST)
    if os.path.exists(manifest):
        try:
            with open(manifest, "rb") as f:
                found = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise InputError(f"{shown(manifest)}: unreadable ({describe(exc)})") from None
        if not isinstance(found, dict) or found.get("format") != FORMAT:
            raise InputError(f"{shown(manifest)}: not a manifest of this npconvnext version's jobs")
        differences = [f"{key} {found.get(key)!r} there, {value!r} now" for key, value in record.items()
                       if found.get(key) != value]
        if differences:
            raise InputError(f"{shown(output)}: holds another job ({'; '.join(differences)}): give another "
                             "output directory, or remove this one to start again")
        return
    if os.path.isdir(output) and os.listdir(output):
        raise InputError(f"{shown(output)}: is not empty and has no {MANIFEST}: not an npconvnext job; "
                         "give a new or empty directory")
    os.makedirs(output, exist_ok=True)
    atomic_write(manifest, (json.dumps(record, indent=2) + "\n").encode())


def finished(output: str, index: int) -> PartitionResult | None:
    """The result of a partition an earlier run finished, or None."""
    try:
        with open(os.path.join(output, part_name(index) + ".jsonl"), "rb") as f:
            rows = [json.loads(line) for line in f]
    except FileNotFoundError:
        return None
    return PartitionResult(index, len(rows), sum("error" in row for row in rows), computed=False)


# ---- one partition, on a worker ----------------------------------------------------------------

def run_partition(index: int, paths: list[str], job: Job, output: str) -> PartitionResult:
    """Classify or embed the images of partition `index` and write its files; a partition
    finished already is not run again."""
    done = finished(output, index)
    if done is not None:
        return done
    threads = task_threads()
    if threads is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))  # this thread's count
    model, config = worker_model(job.spec)
    rows, embeddings, embedded = [], [], []
    for start in range(0, len(paths), job.batch_size):
        chunk = paths[start:start + job.batch_size]
        good, x, failed = read_batch(chunk, config)
        if job.task == "classify":
            results = iter(classify(model, x, job.top_k) if x is not None else [])
        else:
            if x is not None:
                embeddings.append(embed(model, x))
            results = iter(range(len(embedded), len(embedded) + len(good)))
            embedded += good
        for path in chunk:  # input order; a failed path fails wherever it appears
            if path in failed:
                rows.append({"file": shown(path), "error": failed[path]})
            elif job.task == "classify":
                rows.append(classified_row(path, next(results)))
            else:
                rows.append({"file": shown(path), "row": next(results)})
    stem = os.path.join(output, part_name(index))
    if job.task == "features":
        width = model.config.dims[-1]
        matrix = np.concatenate(embeddings) if embeddings else np.zeros((0, width), model.dtype)  # (n, D)
        buffer = io.BytesIO()
        np.save(buffer, matrix)
        atomic_write(stem + ".npy", buffer.getvalue())
        atomic_write(stem + ".files.txt", b"".join(os.fsencode(p) + b"\n" for p in embedded))
    atomic_write(stem + ".jsonl", "".join(json.dumps(row) + "\n" for row in rows).encode())  # last: the mark
    return PartitionResult(index, len(paths), sum("error" in row for row in rows), computed=True)


# ---- the whole job, from the client ------------------------------------------------------------

def run(client, paths: list[str], output: str, job: Job, progress: Callable[[int, int], None] | None = None,
        threads: int | str | None = "auto") -> Summary:
    """Run `job` over `paths` into the directory `output`, resuming a run of the same job there.

    client: a dask.distributed Client, one task per partition; None runs the partitions one
        after another in this process (no Dask needed).
    threads: on a client, each task's model threads: "auto" shares each machine's cores between
        the task threads of the workers on it (see cluster.py), a number sets it, None leaves the
        workers' thread settings alone. "auto" and a number set the workers' BLAS thread count:
        running this job on those workers is taken as asking for that.
    progress(images done, images in all) is called as partitions finish; without it, a progress
    bar on stderr when that is a terminal. The finished job is logged (INFO) on the `npconvnext` logger.
    Raises NpConvNeXtError if any partition failed as a whole (the others are written: a rerun
    retries the failed ones); an image that cannot be read is a row with its error, not a failure.
    """
    with contextlib.ExitStack() as stack:
        if progress is None:
            progress = progress_bars.counter(stack.enter_context(progress_bars.bar(len(paths), job.task)))
        summary = _run(client, paths, os.path.abspath(output), job, progress, threads)
    log.info("%s: %d images in %d partitions -> %s (%d run now, %d finished before); %d could not be read",
             job.task, summary.images, summary.partitions, summary.output, summary.computed, summary.skipped,
             summary.failed, extra={"result": True})  # the command prints it itself
    return summary


def _run(client, paths: list[str], output: str, job: Job, progress: Callable[[int, int], None],
         threads: int | str | None) -> Summary:
    parts = partitions(paths, job.partition_size)
    open_output(output, job, paths)
    results = {i: r for i in range(len(parts)) if (r := finished(output, i)) is not None}
    todo = [i for i in range(len(parts)) if i not in results]
    done_images = sum(r.images for r in results.values())
    progress(done_images, len(paths))
    errors: list[tuple[int, BaseException]] = []
    if client is None:
        for i in todo:
            results[i] = run_partition(i, parts[i], job, output)
            done_images += results[i].images
            progress(done_images, len(paths))
    elif todo:
        from distributed import as_completed

        from .cluster import prepare_workers

        prepare_workers(client, threads)
        run_id = uuid.uuid4().hex[:8]  # fresh keys: the scheduler must not hand back an earlier run's result
        futures = client.map(run_partition, todo, [parts[i] for i in todo], job=job, output=output,
                             key=[f"npconvnext-{part_name(i)}-{run_id}" for i in todo])
        index_of = {future.key: i for future, i in zip(futures, todo)}
        for future in as_completed(futures):
            i = index_of[future.key]
            try:
                results[i] = future.result()
                done_images += results[i].images
            except Exception as exc:  # a partition's own failure (or KilledWorker): the job goes on
                errors.append((i, exc))
            progress(done_images, len(paths))
    if errors:
        i, first = min(errors, key=lambda e: e[0])
        raise NpConvNeXtError(f"{len(errors)} of {len(parts)} partitions failed (first {part_name(i)}: "
                              f"{type(first).__name__}: {describe(first)}); the others are in {shown(output)}: "
                              "run the same job again to retry the failed ones")
    return Summary(output, len(paths), sum(r.failed for r in results.values()), len(parts),
                   computed=sum(r.computed for r in results.values()),
                   skipped=sum(not r.computed for r in results.values()))

