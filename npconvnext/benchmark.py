"""`npconvnext benchmark`: the model's latency and throughput on random input, the figures
OpenVINO's benchmark_app reports (median and 90th-percentile latency of one batch, images per
second over the whole run).

One untimed first batch (it compiles the kernels on a cold Numba cache and touches every
weight), then batches back to back until the time given has passed and at least a few have
run. The input is seeded random noise of the model's input size: the forward pass costs the
same whatever the pixels are.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from .model import ConvNeXt

MIN_ITERATIONS = 3


@dataclass(frozen=True)
class Result:
    model: str            # architecture, and the tag or file the weights came from
    dtype: str
    batch_size: int
    input_size: tuple[int, int]
    threads: int
    first_seconds: float  # the untimed first batch
    iterations: int
    seconds: float        # of the timed batches
    median_ms: float      # latency of one batch
    p90_ms: float
    min_ms: float
    images_per_s: float

    def as_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        h, w = self.input_size
        return (f"{self.model}, {self.dtype}, batch {self.batch_size} of {h}x{w}, {self.threads} threads\n"
                f"first batch (not counted: compiles and warms up): {self.first_seconds:.2f} s\n"
                f"{self.iterations} batches in {self.seconds:.2f} s\n"
                f"latency per batch: median {self.median_ms:.2f} ms, p90 {self.p90_ms:.2f} ms, "
                f"min {self.min_ms:.2f} ms\n"
                f"throughput: {self.images_per_s:.2f} images/s")


def run(model: ConvNeXt, name: str, batch_size: int = 1, seconds: float = 10.0,
        input_size: tuple[int, int] | None = None, threads: int = 1, seed: int = 0,
        tick: Callable[[float], None] | None = None) -> Result:
    """Time `model` on batches of `batch_size` random images for about `seconds` seconds.
    tick(elapsed seconds) is called after each timed batch (a progress bar's hook)."""
    h, w = input_size or model.data_config.input_size
    x = np.random.default_rng(seed).standard_normal((batch_size, 3, h, w)).astype(model.dtype)
    start = time.perf_counter()
    model(x)
    first = time.perf_counter() - start
    latencies: list[float] = []
    began = time.perf_counter()
    while len(latencies) < MIN_ITERATIONS or time.perf_counter() - began < seconds:
        start = time.perf_counter()
        model(x)
        latencies.append(time.perf_counter() - start)
        if tick:
            tick(time.perf_counter() - began)
    total = time.perf_counter() - began
    ms = 1000 * np.asarray(latencies)
    return Result(name, model.dtype.name, batch_size, (h, w), threads, round(first, 4), len(latencies),
                  round(total, 4), round(float(np.median(ms)), 3), round(float(np.percentile(ms, 90)), 3),
                  round(float(ms.min()), 3), round(batch_size * len(latencies) / total, 3))
