"""The one module that imports TensorRT: backend selection, version facts and the version-dependent calls.

Supported: ``tensorrt`` 10.x (weakly typed networks and precision flags still exist), ``tensorrt`` 11.x
(strongly typed only: BuilderFlag.FP16/BF16/INT8/FP8 and the INT8 calibrators were removed, the
STRONGLY_TYPED creation flag is accepted and ignored) and ``tensorrt_rtx`` 1.x (TensorRT for RTX:
strongly typed only, compute-capability targets, builds ahead of time without a GPU). Attributes that
one of them lacks are looked up with getattr and skipped with a logged reason, never assumed.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import os
import signal
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

from ..errors import BuildError, InputError, MissingDependencyError

logger = logging.getLogger(__name__)

BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx", "tensorrt_rtx": "tensorrt_rtx"}
INSTALL_HINT = ("install one: `pip install tensorrt-rtx-cu13` (TensorRT for RTX: GeForce/RTX GPUs, and engine "
                "builds on machines without a GPU) or NVIDIA's `tensorrt` wheel for data-centre GPUs such as H100: "
                "`pip install tensorrt` gives TensorRT 11 (strongly typed, no INT8 calibrator), "
                "`pip install \"tensorrt-cu12<11\"` gives TensorRT 10 (needed by --int8-calibrator). "
                "cu13 wheels (TensorRT 11, tensorrt-rtx-cu13) need a CUDA 13 driver (R580 or newer)")
# GPUs each backend runs on, as (major, minor) bounds; TensorRT-RTX lists its targets in ComputeCapability
MIN_COMPUTE_CAPABILITY = {10: (7, 0), 11: (7, 5)}  # TensorRT 10.x support matrix; CUDA 13 dropped SM < 7.5
GPU_FAMILIES = {(7, 0): "Volta", (7, 2): "Volta", (7, 5): "Turing", (8, 0): "Ampere", (8, 6): "Ampere",
                (8, 7): "Ampere (Jetson Orin)", (8, 9): "Ada", (9, 0): "Hopper, e.g. H100/H200",
                (10, 0): "data-centre Blackwell, e.g. B200", (10, 3): "data-centre Blackwell, e.g. B300",
                (11, 0): "Blackwell (Jetson Thor)", (12, 0): "Blackwell", (12, 1): "Blackwell (GB10)"}
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


def _cuda_driver() -> tuple[Any | None, str]:
    """The initialised CUDA driver library (no CUDA toolkit needed), or None and why."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return None, f"no CUDA driver ({exc})"
    if lib.cuInit(0) != 0:
        return None, "cuInit failed: the CUDA driver found no usable GPU"
    return lib, ""


def cuda_device_count() -> tuple[int, str]:
    """Number of CUDA devices via the driver API and a reason when it is zero."""
    lib, reason = _cuda_driver()
    if lib is None:
        return 0, reason
    count = ctypes.c_int(0)
    if lib.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        return 0, "the CUDA driver reports no GPU"
    return count.value, ""


def cuda_gpu(index: int = 0) -> dict[str, Any] | None:
    """Name, compute capability and driver CUDA version of device ``index`` via the driver API; None without it."""
    lib, _ = _cuda_driver()
    dev = ctypes.c_int(0)
    if lib is None or lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None
    major, minor, version = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    name = ctypes.create_string_buffer(256)
    lib.cuDeviceGetName(name, 256, dev)
    lib.cuDriverGetVersion(ctypes.byref(version))
    return {"index": index, "name": name.value.decode(errors="replace"),
            "compute_capability": f"{major.value}.{minor.value}",
            "driver_cuda_version": f"{version.value // 1000}.{version.value % 1000 // 10}"}


def cc_tuple(text: str) -> tuple[int, int]:
    """"8.9" -> (8, 9)."""
    major, minor = str(text).split(".")
    return int(major), int(minor)


def unsupported_gpu_reason(trt: Any, info: BackendInfo, compute_capability: str) -> str | None:
    """Why ``info``'s TensorRT cannot run on a GPU of this compute capability ("8.9"); None when it can."""
    cc = cc_tuple(compute_capability)
    family = GPU_FAMILIES.get(cc, "unknown family")
    if info.is_rtx:
        known = supported_compute_capabilities(trt)
        if cc[0] * 10 + cc[1] in known:
            return None
        return (f"TensorRT-RTX {info.version} does not support this GPU: compute capability {compute_capability} "
                f"({family}). It runs on compute capability "
                + ", ".join(f"{k // 10}.{k % 10}" for k in known)
                + " (GeForce/RTX GPUs); on this GPU build and run the engine with NVIDIA's `tensorrt` wheel instead")
    floor = MIN_COMPUTE_CAPABILITY.get(info.major)
    if floor is not None and cc < floor:
        return (f"{info.name} {info.version} needs compute capability {floor[0]}.{floor[1]} or newer; this GPU has "
                f"{compute_capability} ({family})")
    return None


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


class BuildInterrupt:
    """Ctrl-C during a TensorRT build. TensorRT's Python callbacks (logger, progress monitor) catch a
    KeyboardInterrupt raised in them ("Exception caught in log()") and the build goes on. While ``armed``, a
    SIGINT handler records the Ctrl-C instead, the progress monitor cancels the build at its next step, and
    ``raise_if_requested`` raises KeyboardInterrupt once the build has returned. A second Ctrl-C exits at once."""

    def __init__(self) -> None:
        self.requested = False

    def is_requested(self) -> bool:
        return self.requested

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.requested:
            logger.error("second Ctrl-C: exiting now")
            os._exit(128 + signum)
        self.requested = True
        logger.warning("Ctrl-C: cancelling the TensorRT build (Ctrl-C again exits at once)")

    @contextlib.contextmanager
    def armed(self) -> Iterator[None]:
        """Hold SIGINT for the block; only in the main thread and over Python's own handler (else left alone)."""
        if (threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            logger.debug("Ctrl-C handler not installed: not the main thread, or SIGINT is handled elsewhere")
            yield
            return
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def raise_if_requested(self) -> None:
        if self.requested:
            raise KeyboardInterrupt("TensorRT build cancelled by Ctrl-C")


def make_progress_monitor(trt: Any, cancelled: Callable[[], bool] = lambda: False) -> Any | None:
    """An IProgressMonitor that logs build phases (tqdm bars for top-level phases on a terminal) and cancels the
    build once ``cancelled()`` is true; None if this TensorRT has none."""
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
            if cancelled():
                self.close_bars()
                return False  # TensorRT cancels the build
            bar = self.bars.get(phase_name)
            if bar is not None:
                bar.update(1)
            return True

        def phase_finish(self, phase_name: str) -> None:
            bar = self.bars.pop(phase_name, None)
            if bar is not None:
                bar.close()
            logger.debug("build phase done: %s", phase_name)

        def close_bars(self) -> None:
            while self.bars:
                self.bars.popitem()[1].close()

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


def set_config(config: Any, attr: str, value: Any, skipped: dict[str, str], check: bool = True) -> bool:
    """Set ``config.attr = value`` if this TensorRT has it (logged reason when not); BuildError if it does not take."""
    if not hasattr(config, attr):
        skipped[attr] = f"IBuilderConfig.{attr} does not exist in this TensorRT"
        logger.info("skipping %s=%s: %s", attr, value, skipped[attr])
        return False
    setattr(config, attr, value)
    if check and getattr(config, attr) != value:  # TensorRT clamps or ignores bad values silently
        raise BuildError(f"IBuilderConfig.{attr} = {value!r} did not take: TensorRT reads back "
                         f"{getattr(config, attr)!r}")
    return True


def set_workspace(trt: Any, config: Any, nbytes: int, skipped: dict[str, str]) -> bool:
    pool = getattr(getattr(trt, "MemoryPoolType", None), "WORKSPACE", None)
    if pool is None or not hasattr(config, "set_memory_pool_limit"):
        skipped["workspace"] = "set_memory_pool_limit(MemoryPoolType.WORKSPACE) does not exist in this TensorRT"
        logger.info("skipping the workspace limit: %s", skipped["workspace"])
        return False
    config.set_memory_pool_limit(pool, nbytes)
    if hasattr(config, "get_memory_pool_limit") and config.get_memory_pool_limit(pool) != nbytes:
        raise BuildError(f"workspace limit {nbytes} bytes did not take: TensorRT reads back "
                         f"{config.get_memory_pool_limit(pool)}")
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
        if hasattr(config, "get_flag") and not config.get_flag(getattr(trt.BuilderFlag, f)):
            raise BuildError(f"BuilderFlag.{f} did not take in {info.name} {info.version}")
    return wanted


def set_compute_capabilities(trt: Any, config: Any, targets: list[int], trt_logger: Any = None) -> None:
    """TensorRT-RTX only: build for these SM targets (e.g. [89, 120]; 0 = CURRENT, which must be alone)."""
    if 0 in targets and len(targets) > 1:
        raise InputError("compute capability 'current' must be the only target (TensorRT-RTX builds CURRENT "
                         "alone); give explicit targets such as 8.9 and 12.0 instead")
    enum = trt.ComputeCapability
    config.num_compute_capabilities = len(targets)
    if config.num_compute_capabilities != len(targets):
        raise BuildError(f"TensorRT refused {len(targets)} compute capability targets "
                         f"(reads back {config.num_compute_capabilities})")
    for i, sm in enumerate(targets):
        value = getattr(enum, f"SM{sm}") if sm else enum.CURRENT
        if not config.set_compute_capability(value, i):
            said = " | ".join((trt_logger.errors if trt_logger is not None else [])[-2:]) or "no message"
            raise BuildError(f"TensorRT refused compute capability target {value.name} at index {i}: {said}")


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


# What each TensorRT-RTX EngineInvalidityDiagnostics bit means for the user
VALIDITY_ADVICE = {
    "VERSION_MISMATCH": "it was built by another TensorRT-RTX version: rebuild it with this one",
    "UNSUPPORTED_CC": "it was built for other GPUs (compute capability targets): rebuild it with "
                      "--compute-capability set to this GPU's",
    "OLD_CUDA_DRIVER": "the NVIDIA driver is too old for this TensorRT-RTX: update it (cu13 wheels need R580 or newer)",
    "OLD_CUDA_RUNTIME": "the CUDA runtime is too old for this engine: update the CUDA runtime or the "
                        "TensorRT-RTX wheel",
    "INSUFFICIENT_GPU_MEMORY": "the GPU has not enough free memory for it: close other GPU programs or use a "
                               "smaller engine (fewer views, lower precision)",
    "MALFORMED_ENGINE": "the file is not a complete TensorRT-RTX engine (truncated, or written by something else): "
                        "rebuild it",
    "CUDA_ERROR": "the CUDA driver or runtime is not installed correctly: reinstall the NVIDIA driver",
}


def engine_validity(trt: Any, engine_path: str | bytes | Any, trt_logger: Any) -> dict[str, Any] | None:
    """TensorRT-RTX ``Runtime.get_engine_validity`` on the engine header: validity, reasons and advice.

    None where the module has no such call (TensorRT 10/11). Reads only the header bytes of a file path.
    """
    if not hasattr(trt.Runtime, "get_engine_validity"):
        return None
    runtime = trt.Runtime(trt_logger)
    size = int(getattr(runtime, "engine_header_size", 0)) or -1
    if isinstance(engine_path, (bytes, bytearray, memoryview)):
        header = bytes(engine_path[:size] if size > 0 else engine_path)
    else:
        with open(engine_path, "rb") as f:
            header = f.read(size)
    logged = len(trt_logger.errors)
    validity, mask = runtime.get_engine_validity(header)
    diagnostics = getattr(trt, "EngineInvalidityDiagnostics", None)
    reasons = [name for name, bit in (diagnostics.__members__.items() if diagnostics else ())
               if int(mask) & int(bit)]
    return {"validity": validity.name, "reasons": reasons, "advice": [VALIDITY_ADVICE.get(r, r) for r in reasons],
            "log": trt_logger.errors[logged:]}


def engine_weight_bytes(trt: Any, engine: Any) -> int | None:
    """Bytes of weights the engine keeps on the device (``get_engine_stat``); None where TensorRT lacks the query."""
    stat = getattr(getattr(trt, "EngineStat", None), "TOTAL_WEIGHTS_SIZE", None)
    if stat is None or not hasattr(engine, "get_engine_stat"):
        return None
    value = int(engine.get_engine_stat(stat))
    return value if value >= 0 else None


def create_context(engine: Any, runtime_cache_blob: bytes | None) -> tuple[Any, Any, Any | None, dict[str, Any]]:
    """An execution context; on TensorRT-RTX with a runtime cache (JIT-compiled kernels), loaded from the blob.

    Returns (context, runtime config (keep it alive with the context), runtime cache or None, status). A
    blob TensorRT-RTX rejects (other GPU, driver or version) leaves the cache empty; the status says so.
    """
    config = engine.create_runtime_config() if hasattr(engine, "create_runtime_config") else None
    if not hasattr(config, "create_runtime_cache"):  # TensorRT 10.11+ has runtime configs without a cache
        return engine.create_execution_context(), None, None, {"used": False,
                                                               "reason": "this TensorRT has no runtime cache"}
    cache = config.create_runtime_cache()
    status: dict[str, Any] = {"used": True, "loaded": False, "loaded_bytes": 0}
    if runtime_cache_blob:
        status["loaded"] = bool(cache.deserialize(runtime_cache_blob))
        status["loaded_bytes"] = len(runtime_cache_blob) if status["loaded"] else 0
        if not status["loaded"]:
            status["reason"] = "TensorRT-RTX rejected the cache (another GPU, driver or TensorRT-RTX version)"
    if not config.set_runtime_cache(cache):
        status.update(used=False, loaded=False, reason="TensorRT-RTX refused the runtime cache")
        cache = None
    return engine.create_execution_context(runtime_config=config), config, cache, status


def serialize_runtime_cache(cache: Any) -> bytes:
    return bytes(memoryview(cache.serialize()))


def add_optimization_profile(builder: Any, config: Any, shapes: dict[str, tuple[Any, Any, Any]]) -> Any:
    """One optimisation profile: input name -> (min, opt, max) shapes; raise InputError when TensorRT refuses it."""
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, tuple(int(d) for d in lo), tuple(int(d) for d in opt), tuple(int(d) for d in hi))
    if config.add_optimization_profile(profile) < 0:
        raise InputError(f"TensorRT refused the optimisation profile {shapes}: each input needs min <= opt <= max "
                         "and the network's fixed axes")
    return profile


def profile_shapes(engine: Any, name: str, index: int = 0) -> tuple[tuple[int, ...], ...] | None:
    """(min, opt, max) shapes of input ``name`` in optimisation profile ``index``; None without profiles."""
    if getattr(engine, "num_optimization_profiles", 0) < 1:
        return None
    return tuple(tuple(int(d) for d in shape) for shape in engine.get_tensor_profile_shape(name, index))
