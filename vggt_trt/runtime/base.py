"""One runner interface for TensorRT engines, ONNX Runtime sessions and the PyTorch model.

Polygraphy's runner contract: a runner is built cheaply (it only stores its arguments), ``activate()``
loads the engine/session/model, ``infer(feeds)`` runs one forward and records ``last_inference_ms``,
``deactivate()`` frees everything; ``with runner:`` does both. ``input_metadata()`` gives each input's
shape (``None`` for a dynamic axis) and numpy dtype, read from the engine, graph or model config.

Timing: on a GPU ``last_inference_ms`` comes from CUDA events around the forward on the runner's stream
(host transfers excluded); on CPU from ``time.perf_counter``. :func:`benchmark` reports which was used.
"""

from __future__ import annotations

import logging
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError, VggtTrtError

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "engine", "onnx", "torch")


class RuntimeUnavailableError(VggtTrtError):
    """The runner cannot run on this machine (no GPU, unsupported GPU, engine from another TensorRT)."""


@dataclass(frozen=True)
class TensorMeta:
    """One input or output: shape (``None`` for a dynamic axis) and numpy dtype name."""

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @property
    def fixed(self) -> bool:
        return all(isinstance(d, int) and d > 0 for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _dims(shape: Sequence[Any]) -> tuple[int | None, ...]:
    return tuple(int(d) if isinstance(d, (int, np.integer)) and int(d) > 0 else None for d in shape)


class Runner:
    """Base runner: activation bookkeeping, input checks and timing; backends implement the ``*_impl`` hooks."""

    backend = "base"

    def __init__(self, name: str) -> None:
        self.name = name
        self.is_active = False
        self.last_inference_ms: float | None = None
        self.timing_method = "perf_counter"
        self.device = "cpu"

    # -- lifecycle
    def activate(self) -> "Runner":
        if self.is_active:
            logger.debug("%s is already active", self.name)
            return self
        t0 = time.perf_counter()
        self.activate_impl()
        self.is_active = True
        logger.info("activated %s runner %s in %.2f s (%s)", self.backend, self.name, time.perf_counter() - t0,
                    self.device)
        return self

    def deactivate(self) -> None:
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, *exc: Any) -> None:
        self.deactivate()

    # -- metadata and inference
    def input_metadata(self) -> list[TensorMeta]:
        self._require_active()
        return self.input_metadata_impl()

    def output_names(self) -> list[str]:
        self._require_active()
        return self.output_names_impl()

    def infer(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one forward on host arrays; returns host arrays keyed by output name."""
        out = self.infer_device(feeds)
        return {k: v if isinstance(v, np.ndarray) else v.detach().float().cpu().numpy() for k, v in out.items()}

    def infer_device(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Like :meth:`infer` but outputs stay where the backend made them (torch CUDA tensors on a GPU)."""
        self._require_active()
        self._check_feeds(feeds)
        self.last_inference_ms = None
        out = self.infer_impl(feeds)
        if self.last_inference_ms is None:
            logger.warning("%s did not record an inference time", self.name)
        return out

    def info(self) -> dict[str, Any]:
        return {"backend": self.backend, "name": self.name, "device": self.device, "timing": self.timing_method}

    # -- helpers
    def _require_active(self) -> None:
        if not self.is_active:
            raise InputError(f"runner {self.name} is not active: call activate() or use it in a with-block")

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        meta = {m.name: m for m in self.input_metadata_impl()}
        missing = sorted(set(meta) - set(feeds))
        extra = sorted(set(feeds) - set(meta))
        if missing or extra:
            raise InputError(f"{self.name}: inputs {sorted(meta)} expected; missing {missing}, unexpected {extra}")
        for name, m in meta.items():
            shape = tuple(np.shape(feeds[name]))
            if len(shape) != len(m.shape) or any(d is not None and d != s for d, s in zip(m.shape, shape)):
                raise InputError(f"{self.name}: input {name!r} has shape {list(shape)}, expected {list(m.shape)} "
                                 "(None = any size)")

    # -- hooks
    def activate_impl(self) -> None:
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        raise NotImplementedError

    def input_metadata_impl(self) -> list[TensorMeta]:
        raise NotImplementedError

    def output_names_impl(self) -> list[str]:
        raise NotImplementedError

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        raise NotImplementedError


def _torch_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeUnavailableError(f"device {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU")
    return device


class TorchRunner(Runner):
    """Our VGGT in PyTorch at any preset/weights and precision (the accuracy reference)."""

    backend = "torch"

    def __init__(self, model_name: str = "facebook/VGGT-1B", weights: str | os.PathLike | None = None,
                 precision: str = "fp32", device: str = "auto", outputs: Sequence[str] | None = None,
                 input_shape: Sequence[int] | None = None, random_init: bool = False, seed: int = 0,
                 model: Any = None) -> None:
        super().__init__(f"torch:{model_name}:{precision}")
        self.model_name, self.weights, self.precision = model_name, weights, precision
        self.requested_device, self.outputs = device, tuple(outputs) if outputs else None
        self.input_shape = tuple(input_shape) if input_shape else None
        self.random_init, self.seed, self._given_model = random_init, seed, model
        self.model: Any = None
        self._ctx: Any = None

    def activate_impl(self) -> None:
        import torch

        from ..model.precision import apply_precision
        from ..model.vggt import PCD_OUTPUTS, check_image_shape
        from ..model.weights import build_model

        self.device = _torch_device(self.requested_device)
        model = self._given_model or build_model(self.model_name, self.weights, self.random_init, self.seed)
        self.model = model.to(self.device).eval()
        self._ctx = apply_precision(self.model, self.precision)
        self.outputs = self.outputs or PCD_OUTPUTS
        if self.input_shape:
            check_image_shape(self.input_shape)
        self.timing_method = "cuda-events" if self.device.startswith("cuda") else "perf_counter"
        torch.set_grad_enabled(False)

    def deactivate_impl(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    @property
    def config(self) -> Any:
        self._require_active()
        return self.model.cfg

    def input_metadata_impl(self) -> list[TensorMeta]:
        shape = self.input_shape or (None, 3, None, None)
        return [TensorMeta("images", _dims(shape) if self.input_shape else (None, 3, None, None), "float32")]

    def output_names_impl(self) -> list[str]:
        return list(self.outputs)

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import torch

        images = torch.as_tensor(np.ascontiguousarray(feeds["images"]), dtype=torch.float32).to(self.device)
        cuda = self.device.startswith("cuda")
        with torch.inference_mode(), self._ctx():
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = self.model(images, outputs=self.outputs)
                end.record()
                end.synchronize()
                self.last_inference_ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                out = self.model(images, outputs=self.outputs)
                self.last_inference_ms = (time.perf_counter() - t0) * 1e3
        return {k: v.float() for k, v in out.items()}


class OrtRunner(Runner):
    """ONNX Runtime on CPU, or on its CUDA / TensorRT execution providers when installed."""

    backend = "onnx"
    _ALIASES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, opt_level: str = "basic",
                 threads: int = 0) -> None:
        super().__init__(f"onnx:{Path(path).name}")
        self.path = Path(path)
        self.requested_providers = list(providers) if providers else None
        self.opt_level, self.threads = opt_level, threads
        self.session: Any = None

    def activate_impl(self) -> None:
        if not self.path.is_file():
            raise InputError(f"ONNX file not found: {self.path}")
        try:
            import onnxruntime as ort
        except ImportError as exc:
            from ..errors import MissingDependencyError

            raise MissingDependencyError(f"onnxruntime is needed to run {self.path.name}: pip install onnxruntime "
                                         "(or onnxruntime-gpu)") from exc
        available = ort.get_available_providers()
        if self.requested_providers is None:
            providers = ["CUDAExecutionProvider"] if "CUDAExecutionProvider" in available else []
            if not providers:
                logger.info("ONNX Runtime: CUDAExecutionProvider not available (%s); running on CPU", available)
        else:
            providers = [self._ALIASES.get(p.lower(), p) for p in self.requested_providers]
            missing = [p for p in providers if p not in available]
            if missing:
                raise RuntimeUnavailableError(f"ONNX Runtime {ort.__version__} lacks {missing}; available: {available}")
        providers = [p for p in providers if p != "CPUExecutionProvider"] + ["CPUExecutionProvider"]
        levels = {"disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
                  "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                  "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
                  "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
        if self.opt_level not in levels:
            raise InputError(f"unknown ORT optimisation level {self.opt_level!r}; use one of {sorted(levels)}")
        so = ort.SessionOptions()
        so.graph_optimization_level = levels[self.opt_level]
        so.log_severity_level = 3
        if self.threads:
            so.intra_op_num_threads = self.threads
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=providers)
        except _ort_errors() as exc:
            from ..errors import GraphError

            raise GraphError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        used = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in used or "TensorrtExecutionProvider" in used else "cpu"
        self.providers = used
        logger.info("ONNX Runtime %s providers: %s (optimisation level %s)", ort.__version__, used, self.opt_level)

    def deactivate_impl(self) -> None:
        self.session = None

    def input_metadata_impl(self) -> list[TensorMeta]:
        return [TensorMeta(i.name, _dims(i.shape), _ort_dtype(i.type)) for i in self.session.get_inputs()]

    def output_names_impl(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        meta = {m.name: m for m in self.input_metadata_impl()}
        inputs = {k: np.ascontiguousarray(v, dtype=meta[k].dtype) for k, v in feeds.items()}
        names = self.output_names_impl()
        t0 = time.perf_counter()
        values = self.session.run(names, inputs)
        self.last_inference_ms = (time.perf_counter() - t0) * 1e3
        return dict(zip(names, values))

    def info(self) -> dict[str, Any]:
        return {**super().info(), "providers": getattr(self, "providers", None), "opt_level": self.opt_level}


def _ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (they do not share a base class beyond RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError,)


def _ort_dtype(type_str: str) -> str:
    inner = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else type_str
    return {"float": "float32", "float16": "float16", "double": "float64", "bfloat16": "float32"}.get(inner, inner)


def make_runner(path_or_spec: str | os.PathLike | None, backend: str = "auto", **kwargs: Any) -> Runner:
    """A runner for an ``.engine``/``.plan`` (TensorRT), ``.onnx`` (ONNX Runtime) or a torch model name.

    ``backend="auto"`` picks by file suffix; a non-file argument (or ``backend="torch"``) is a model
    preset/hub id for :class:`TorchRunner`. ``kwargs`` go to the runner's constructor.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    text = os.fspath(path_or_spec) if path_or_spec is not None else ""
    suffix = Path(text).suffix.lower()
    if backend == "auto":
        backend = {".engine": "engine", ".plan": "engine", ".trt": "engine", ".onnx": "onnx"}.get(suffix, "torch")
        if backend == "torch" and Path(text).is_file():
            raise InputError(f"cannot tell the backend of {text}: expected .engine/.plan or .onnx")
    if backend == "engine":
        return TrtRunner(text, **kwargs)
    if backend == "onnx":
        return OrtRunner(text, **kwargs)
    return TorchRunner(model_name=text or "facebook/VGGT-1B", **kwargs)


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
    runner._require_active()
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
        if hasattr(runner, "device_memory_bytes"):  # TensorRT: activations live outside torch's allocator
            peak_bytes += runner.device_memory_bytes()
            method += " (I/O buffers) + engine device_memory_size (activations)"
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


def random_feeds(meta: Sequence[TensorMeta], default_shape: Sequence[int] = (2, 3, 518, 518),
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform [0, 1) inputs for the runner's inputs; dynamic axes take ``default_shape``'s values."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for m in meta:
        shape = [d if d is not None else int(default_shape[i]) for i, d in enumerate(m.shape)]
        feeds[m.name] = rng.random(shape, dtype=np.float32).astype(m.dtype)
    return feeds


# The TensorRT runner lives in its own module (it only needs Runner/TensorMeta from here); re-exported.
from .trt_runner import TrtRunner, check_engine_can_run, cuda_compute_capability  # noqa: E402
