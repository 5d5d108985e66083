"""Images per second of a classify job end to end (JPEG decode + preprocess + forward + write),
in one process and on local Dask clusters, and the scheduler's cost per task.

    python benchmarks/bench_distributed.py [--images 2000] [--model convnext_tiny] [--size 224]
        [--clusters 1x1,2x1,1x2] [--partition-size 64] [--batch-size 16] [--json]
    python benchmarks/bench_distributed.py --images 64 --model convnext_atto --size 64   # a check

A folder of synthetic JPEGs of random sizes (smooth colour fields with noise, like photos to the
decoder) and random weights written to a safetensors file (nothing is downloaded) go to --workdir
and are reused. Then, each after a warm-up job that builds the model and loads the kernels:

    single process   `npconvnext classify --output` without --scheduler: the command's per-batch
                     code in this process (a batch shared image by image between the threads)
    cluster WxT      W worker processes of T task threads (`--clusters 2x1`: two workers of one),
                     the model's threads set by the worker plugin (npconvnext/distributed/cluster.py)

and, on the last cluster, the scheduler's cost per task: many empty tasks at once (throughput)
and one at a time (round trip). Prints a table; --json prints the rows as JSON too.
Never run as a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np

import npconvnext
from npconvnext.atomic import atomic_write
from npconvnext.distributed import Job, ModelSpec, cluster, list_images, run, worker
from npconvnext.formats.safetensors_writer import safetensors_chunks
from npconvnext.params import random_state_dict

SIDES = (160, 800)   # random image sides, pixels
QUALITY = 90         # JPEG quality
EMPTY_TASKS = 2000   # for the per-task cost, at once
ROUND_TRIPS = 100    # and one at a time


def make_images(folder: str, count: int, seed: int = 0) -> list[str]:
    """`count` JPEGs of random sizes in `folder` (kept: a folder with them all is reused)."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    names = [os.path.join(folder, f"img{i:06d}.jpg") for i in range(count)]
    rng = np.random.default_rng(seed)
    for name in names:
        h, w = rng.integers(*SIDES, size=2)
        if os.path.exists(name):
            continue
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((int(w), int(h)), Image.BILINEAR), np.int16)
        noise = rng.integers(-12, 13, field.shape, dtype=np.int16)
        Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8)).save(name, quality=QUALITY)
    return names


def make_weights(path: str, arch: str) -> str:
    if not os.path.exists(path):
        state = random_state_dict(npconvnext.get_config(arch))
        atomic_write(path, safetensors_chunks(state, {"format": "pt"}))
    return path


def timed_job(client, paths, workdir, name, job) -> float:
    """Seconds of one job into a fresh output directory, after a warm-up job."""
    warm = os.path.join(workdir, f"warm-{name}")
    out = os.path.join(workdir, f"out-{name}")
    for folder in (warm, out):
        shutil.rmtree(folder, ignore_errors=True)
    if client is not None:
        client.run(worker.worker_model, job.spec)  # every worker builds its model before the clock starts
    few = max(2, 2 * len(client.scheduler_info()["workers"]) if client is not None else 2)
    run(client, paths[:few], warm, Job(job.task, job.spec, job.top_k, job.batch_size, partition_size=1))
    start = time.perf_counter()
    run(client, paths, out, job)
    return time.perf_counter() - start


def _noop(i):
    return i


def task_costs(client) -> tuple[float, float]:
    """(ms per empty task with many in flight, ms per round trip of one)."""
    client.gather(client.map(_noop, range(50), pure=False))  # warm
    start = time.perf_counter()
    client.gather(client.map(_noop, range(EMPTY_TASKS), pure=False))
    many = (time.perf_counter() - start) / EMPTY_TASKS
    start = time.perf_counter()
    for i in range(ROUND_TRIPS):
        client.submit(_noop, i, pure=False).result()
    one = (time.perf_counter() - start) / ROUND_TRIPS
    return 1e3 * many, 1e3 * one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--model", default="convnext_tiny")
    parser.add_argument("--size", type=int, default=224, help="input size (crop)")
    parser.add_argument("--clusters", default="1x1,2x1,1x2", help="WxT: W worker processes of T threads each")
    parser.add_argument("--partition-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "npconvnext-bench-distributed"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from distributed import Client

    paths = list_images(make_images(os.path.join(args.workdir, "images"), args.images))
    weights = make_weights(os.path.join(args.workdir, f"{args.model}.safetensors"), args.model)
    job = Job("classify", ModelSpec(args.model, weights, input_size=args.size), batch_size=args.batch_size,
              partition_size=args.partition_size)
    rows = []
    seconds = timed_job(None, paths, args.workdir, "single", job)
    cores = cluster.available_cores()
    rows.append({"run": "single process", "workers": 1, "task_threads": 1, "model_threads": cores, "seconds": seconds})
    costs = None
    for spec in args.clusters.split(","):
        workers, threads = map(int, spec.split("x"))
        with cluster.local_cluster(workers, threads_per_worker=threads) as local, Client(local) as client:
            seconds = timed_job(client, paths, args.workdir, spec, job)
            rows.append({"run": f"cluster {spec}", "workers": workers, "task_threads": threads,
                         "model_threads": max(1, cores // (workers * threads)), "seconds": seconds})
            costs = task_costs(client)
    single = rows[0]["seconds"]
    print(f"{args.model} at {args.size}, {len(paths)} JPEGs, partitions of {args.partition_size}, batches of "
          f"{args.batch_size}, {cluster.available_cores()} cores")
    print(f"{'run':<16} {'model threads':>13} {'images/s':>9} {'vs single':>9} {'seconds':>8}")
    for row in rows:
        row.update(images_per_s=len(paths) / row["seconds"], speedup=single / row["seconds"])
        print(f"{row['run']:<16} {row['model_threads']:>13} {row['images_per_s']:9.1f} {row['speedup']:8.2f}x "
              f"{row['seconds']:8.1f}")
    if costs:
        print(f"scheduler: {costs[0]:.2f} ms per empty task with {EMPTY_TASKS} in flight, "
              f"{costs[1]:.2f} ms per round trip of one")
    if args.json:
        print(json.dumps({"model": args.model, "size": args.size, "images": len(paths), "rows": rows,
                          "ms_per_task": costs and costs[0], "ms_per_round_trip": costs and costs[1]}, indent=2))


if __name__ == "__main__":
    main()
