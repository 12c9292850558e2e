"""Latency statistics of repeated inference on any runner (median / p90 / p99, FPS, peak device memory)."""

from __future__ import annotations

import logging
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .base import Runner

logger = logging.getLogger(__name__)


@dataclass
class BenchmarkResult:
    """Latency statistics of repeated inference; ``to_dict`` is JSON-able."""

    runner: dict[str, Any]
    input_shapes: dict[str, list[int]]
    warmup: int
    iters: int
    timing_method: str
    latency_ms: dict[str, float]
    e2e_ms: dict[str, float]
    fps: float
    views_per_s: float | None
    peak_device_memory_mb: float | None
    memory_method: str
    host_peak_rss_mb: float
    samples_ms: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _stats(values: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(arr)), "mean": float(arr.mean()), "p90": float(np.percentile(arr, 90)),
            "p99": float(np.percentile(arr, 99)), "min": float(arr.min()), "max": float(arr.max()),
            "stdev": float(statistics.pstdev(arr.tolist()))}


def benchmark(runner: Runner, feeds: Mapping[str, np.ndarray], warmup: int = 3, iters: int = 10) -> BenchmarkResult:
    """Warm up, then time ``iters`` forwards: median/p90/p99 latency, FPS, peak device memory.

    ``latency_ms`` is the runner's own timing (CUDA events on a GPU, perf_counter on CPU; see
    ``timing_method``); ``e2e_ms`` adds host-side work (uploads, downloads) measured with perf_counter.
    """
    if iters < 1 or warmup < 0:
        raise InputError(f"benchmark needs iters >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    runner.require_active()
    cuda = runner.device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        runner.infer_device(feeds)
    samples, e2e = [], []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.infer_device(feeds)
        e2e.append((time.perf_counter() - t0) * 1e3)
        samples.append(float(runner.last_inference_ms))
    peak, method = None, "not measured on CPU (see host_peak_rss_mb)"
    if cuda:
        peak_bytes = torch.cuda.max_memory_allocated()
        method = "torch.cuda.max_memory_allocated"
        if hasattr(runner, "device_memory_bytes"):  # TensorRT: weights and activations live outside torch
            peak_bytes += runner.device_memory_bytes()
            method += (f" (I/O buffers) + engine weights ({runner.weights_method}) + engine device_memory_size "
                       "(activations)")
        peak = peak_bytes / 2**20
    latency = _stats(samples)
    images = feeds.get("images")
    views = int(np.shape(images)[0]) if images is not None and np.ndim(images) == 4 else None
    fps = 1e3 / latency["median"] if latency["median"] > 0 else float("inf")
    result = BenchmarkResult(
        runner=runner.info(), input_shapes={k: list(np.shape(v)) for k, v in feeds.items()}, warmup=warmup,
        iters=iters, timing_method=runner.timing_method, latency_ms=latency, e2e_ms=_stats(e2e), fps=fps,
        views_per_s=fps * views if views else None, peak_device_memory_mb=peak, memory_method=method,
        host_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, samples_ms=samples)
    logger.info("benchmark %s: median %.2f ms, p90 %.2f, p99 %.2f, %.2f FPS (%s)", runner.name, latency["median"],
                latency["p90"], latency["p99"], fps, runner.timing_method)
    return result
