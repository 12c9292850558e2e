"""The one module that imports TensorRT: backend selection, version facts and the version-dependent calls.

Supported: ``tensorrt`` 10.x (weakly typed networks and precision flags still exist), ``tensorrt`` 11.x
(strongly typed only: BuilderFlag.FP16/BF16/INT8/FP8 and the INT8 calibrators were removed, the
STRONGLY_TYPED creation flag is accepted and ignored) and ``tensorrt_rtx`` 1.x (TensorRT for RTX:
strongly typed only, compute-capability targets, builds ahead of time without a GPU). Attributes that
one of them lacks are looked up with getattr and skipped with a logged reason, never assumed.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError, MissingDependencyError

logger = logging.getLogger(__name__)

BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx", "tensorrt_rtx": "tensorrt_rtx"}
INSTALL_HINT = ("install one: `pip install tensorrt-rtx-cu13` (TensorRT for RTX: GeForce/RTX GPUs, and engine "
                "builds on machines without a GPU) or NVIDIA's `tensorrt` wheel (`pip install tensorrt`, for "
                "data-centre GPUs such as H100)")
# Output dtype names as the rest of the toolkit spells precisions
DTYPE_NAMES = {"FLOAT": "fp32", "HALF": "fp16", "BF16": "bf16", "INT8": "int8", "FP8": "fp8", "INT4": "int4",
               "FP4": "fp4", "INT32": "int32", "INT64": "int64", "BOOL": "bool", "UINT8": "uint8", "E8M0": "e8m0"}


@dataclass(frozen=True)
class BackendInfo:
    """What the imported TensorRT module is and which build path it allows."""

    name: str  # "tensorrt" or "tensorrt_rtx"
    version: str
    major: int
    strongly_typed_only: bool  # tensorrt >= 11 and tensorrt_rtx: precision comes from the ONNX types
    has_precision_flags: bool  # tensorrt 10: BuilderFlag.FP16/BF16/INT8/FP8 exist (legacy weakly typed path)
    import_errors: dict[str, str] = field(default_factory=dict)

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"

    @property
    def cache_key(self) -> str:
        """Identifies the builder that wrote a timing cache: a cache is only fed back to the same key."""
        return f"{self.name}-{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _import(module_name: str) -> Any:
    return importlib.import_module(module_name)


def import_tensorrt(backend: str = "auto") -> tuple[Any, BackendInfo]:
    """Import TensorRT: ``auto`` tries ``tensorrt`` first, then ``tensorrt_rtx``; returns (module, info)."""
    if backend != "auto" and backend not in BACKENDS:
        raise InputError(f"unknown TensorRT backend {backend!r}; use auto, tensorrt or tensorrt-rtx")
    candidates = ["tensorrt", "tensorrt_rtx"] if backend == "auto" else [BACKENDS[backend]]
    errors: dict[str, str] = {}
    for name in candidates:
        try:
            trt = _import(name)
            version = str(trt.__version__)
            has_flags = hasattr(trt.BuilderFlag, "FP16")  # a PyPI stub without the real bindings fails here
        except (ImportError, OSError, AttributeError) as exc:  # missing wheel, missing libnvinfer, PyPI stub
            errors[name] = f"{type(exc).__name__}: {exc}"
            logger.debug("cannot import %s: %s", name, errors[name])
            continue
        major = int(version.split(".")[0])
        info = BackendInfo(name=name, version=version, major=major,
                           strongly_typed_only=name == "tensorrt_rtx" or major >= 11 or not has_flags,
                           has_precision_flags=has_flags, import_errors=errors)
        if errors:
            logger.info("using %s %s (%s)", name, version,
                        "; ".join(f"{k} not importable: {v}" for k, v in errors.items()))
        else:
            logger.info("using %s %s", name, version)
        return trt, info
    tried = "; ".join(f"{k}: {v}" for k, v in errors.items())
    raise MissingDependencyError(f"no TensorRT module could be imported (tried {tried}); {INSTALL_HINT}")


def dtype_name(dtype: Any) -> str:
    """``trt.DataType.HALF`` -> "fp16" (unknown types keep TensorRT's name, lower-cased)."""
    name = getattr(dtype, "name", str(dtype)).split(".")[-1]
    return DTYPE_NAMES.get(name, name.lower())


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA devices via the driver API (no CUDA toolkit needed) and a reason when it is zero."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return 0, f"no CUDA driver ({exc})"
    if lib.cuInit(0) != 0:
        return 0, "cuInit failed: the CUDA driver found no usable GPU"
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the CUDA driver reports no GPU"
    return count.value, ""


def make_logger(trt: Any, min_severity: str = "WARNING") -> Any:
    """A TensorRT ILogger that forwards to Python logging and keeps the error messages for error reports."""
    severity = trt.ILogger.Severity
    levels = {severity.INTERNAL_ERROR: logging.CRITICAL, severity.ERROR: logging.ERROR,
              severity.WARNING: logging.WARNING, severity.INFO: logging.INFO, severity.VERBOSE: logging.DEBUG}
    floor = levels[getattr(severity, min_severity)]
    trt_log = logging.getLogger(f"{__name__}.trt")

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, sev: Any, msg: str) -> None:  # TensorRT C callback: never raise
            level = levels.get(sev, logging.INFO)
            if level >= logging.ERROR:
                self.errors.append(msg)
            if level >= floor:
                trt_log.log(level, "%s", msg)

    return _Logger()


def make_progress_monitor(trt: Any) -> Any | None:
    """An IProgressMonitor that logs build phases (tqdm bars for top-level phases on a terminal); None if absent."""
    if not hasattr(trt, "IProgressMonitor"):
        logger.info("this TensorRT has no IProgressMonitor; building without progress reports")
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                logger.debug("build phase start: %s (%d steps, parent %s)", phase_name, num_steps, parent_phase)
                if parent_phase is None and tqdm is not None:
                    self.bars[phase_name] = tqdm(total=num_steps, desc=phase_name, leave=False, disable=None)
            except (ValueError, TypeError, OSError) as exc:  # C callback: log, never raise
                logger.debug("progress monitor: %s", exc)

        def step_complete(self, phase_name: str, step: int) -> bool:
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(1)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()
            logger.debug("build phase done: %s", phase_name)

    return _Monitor()


def create_network(trt: Any, builder: Any, info: BackendInfo, strongly_typed: bool) -> Any:
    """Create a network: strongly typed where asked (and always where the module allows nothing else)."""
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    strong_flag = getattr(flags, "STRONGLY_TYPED", None) if flags is not None else None
    if strongly_typed and strong_flag is not None:
        return builder.create_network(1 << int(strong_flag))
    if strongly_typed and not info.strongly_typed_only:
        raise InputError(f"{info.name} {info.version} has no STRONGLY_TYPED network flag; "
                         "strongly typed builds need TensorRT >= 9 (or use the legacy precision flags)")
    return builder.create_network(0)  # TRT >= 10: explicit batch is implicit; EXPLICIT_BATCH is gone in 11


def set_config(config: Any, attr: str, value: Any, skipped: dict[str, str]) -> bool:
    """Set ``config.attr = value`` if this TensorRT has it; record and log the reason when it does not."""
    if not hasattr(config, attr):
        skipped[attr] = f"IBuilderConfig.{attr} does not exist in this TensorRT"
        logger.info("skipping %s=%s: %s", attr, value, skipped[attr])
        return False
    setattr(config, attr, value)
    return True


def set_workspace(trt: Any, config: Any, nbytes: int, skipped: dict[str, str]) -> bool:
    pool = getattr(getattr(trt, "MemoryPoolType", None), "WORKSPACE", None)
    if pool is None or not hasattr(config, "set_memory_pool_limit"):
        skipped["workspace"] = "set_memory_pool_limit(MemoryPoolType.WORKSPACE) does not exist in this TensorRT"
        logger.info("skipping the workspace limit: %s", skipped["workspace"])
        return False
    config.set_memory_pool_limit(pool, nbytes)
    return True


def set_precision_flags(trt: Any, config: Any, info: BackendInfo, precision: str) -> list[str]:
    """Legacy weakly typed path (TensorRT 10): the builder flags that let TensorRT pick lower-precision kernels."""
    flags = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "int8": ["INT8", "FP16"], "fp8": ["FP8", "FP16"],
             "int4": ["INT4", "FP16"]}
    wanted = flags[precision]
    missing = [f for f in wanted if not hasattr(trt.BuilderFlag, f)]
    if missing:
        raise InputError(f"{info.name} {info.version} has no BuilderFlag.{'/'.join(missing)}: "
                         f"{precision} needs a strongly typed {precision} ONNX graph instead")
    for f in wanted:
        config.set_flag(getattr(trt.BuilderFlag, f))
    return wanted


def set_compute_capabilities(trt: Any, config: Any, targets: list[int]) -> None:
    """TensorRT-RTX only: build for these SM targets (e.g. [89, 120])."""
    enum = trt.ComputeCapability
    config.num_compute_capabilities = len(targets)
    for i, sm in enumerate(targets):
        config.set_compute_capability(getattr(enum, f"SM{sm}") if sm else enum.CURRENT, i)


def supported_compute_capabilities(trt: Any) -> list[int]:
    enum = getattr(trt, "ComputeCapability", None)
    if enum is None:
        return []
    return sorted(int(name[2:]) for name in enum.__members__ if name.startswith("SM"))


def parser_errors(parser: Any) -> list[str]:
    """Every error the ONNX parser recorded, with node index, name and operator where the module tells them."""
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        parts = [f"node {err.node()}" if hasattr(err, "node") else ""]
        for attr, label in (("node_name", "name"), ("node_operator", "op")):
            value = getattr(err, attr, None)
            if callable(value) and value():
                parts.append(f"{label} {value()}")
        out.append(f"[{', '.join(p for p in parts if p)}] {err.desc()}")
    return out


def deserialize_engine(trt: Any, engine_bytes: bytes | memoryview, trt_logger: Any) -> tuple[Any, Any | None]:
    """(runtime, engine); engine is None when TensorRT cannot deserialise it (e.g. no GPU: it logs why).

    The runtime is returned too because it must outlive the engine.
    """
    runtime = trt.Runtime(trt_logger)
    return runtime, runtime.deserialize_cuda_engine(engine_bytes)
