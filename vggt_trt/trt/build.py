"""ONNX -> TensorRT / TensorRT-RTX engine build, timing cache, precision inspection and build result.

Two typing paths, chosen from the imported module (``trt_backend.import_tensorrt``):

- strongly typed (TensorRT >= 11, TensorRT-RTX, and TensorRT 10 when asked): the precision comes from the
  ONNX types, so fp16/bf16 need a cast graph (``graph.cast_precision``) and int8/fp8 a Q/DQ graph;
- weakly typed (TensorRT 10 default, the original toolkit's behaviour): an fp32 graph plus
  BuilderFlag.FP16/BF16/INT8/FP8, with an optional INT8 calibrator.

Timing cache: kept at the path the caller names (``trt_timing.cache``) with a sidecar
``trt_timing.cache.json`` holding the writer's key (:func:`timing_cache_key`: ``<module>-<version>``, the GPU's
name and compute capability) and the cache's SHA-256 (:mod:`vggt_trt.trt.cache_files`). A cache whose key
differs (another TensorRT version or GPU) or whose hash does not match (interrupted write) is never fed to the
builder: it is ignored with a log line and replaced after the build. Reading, and merging a valid cache that
another build wrote meanwhile (ITimingCache.combine) then writing, happen under a file lock
(``trt_timing.cache.lock``), so concurrent builds (sweeps with JOBS or Ray) never write it at once. TensorRT-RTX
ignores timing caches (no-ops, deprecated since TensorRT-RTX 1.2), so RTX builds skip them and say so.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import backend as tb
from . import cache_files
from ..atomic import atomic_path
from ..errors import BuildError, InputError
from ..precisions import PRECISIONS

logger = logging.getLogger(__name__)

FP8_TARGETS = (89, 120)  # Ada and Blackwell: the RTX GPUs with FP8 (TensorRT-RTX support matrix)
_UNSUPPORTED = {"fp8": {75, 80, 86}, "bf16": {75}, "int4": {75}}  # TensorRT-RTX support matrix: no FP8 before SM89, no BF16 on Turing
_FALLBACK = {"fp8": "FP16/FP32", "int8": "FP16/FP32", "int4": "FP16/FP32", "fp16": "FP32", "bf16": "FP32"}


@dataclass
class BuildResult:
    """Everything a build report needs; ``to_dict`` is JSON-able."""

    engine_path: str
    onnx_path: str
    precision: str
    backend: str
    backend_version: str
    typing: str  # "strong" or "weak" (legacy precision flags)
    flags: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    skipped_settings: dict[str, str] = field(default_factory=dict)
    compute_capabilities: list[str] | None = None
    target_gpu: dict[str, Any] | None = None  # the GPU that CURRENT / a full-TensorRT build was made for
    profile: dict[str, dict[str, list[int]]] | None = None  # input -> min/opt/max shapes (dynamic inputs)
    timing_cache: dict[str, Any] = field(default_factory=dict)
    parse_seconds: float = 0.0
    build_seconds: float = 0.0
    total_seconds: float = 0.0
    engine_bytes: int = 0
    network_precision: dict[str, Any] = field(default_factory=dict)
    engine_precision: dict[str, Any] | None = None
    engine_precision_note: str = "engine-level precision check is advisory: fused blocks hide inner types"
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------------------- precision summaries
def _counts(counter: collections.Counter[str]) -> dict[str, int]:
    return dict(counter.most_common())


def _all_dtypes(*counters: collections.Counter[str]) -> dict[str, int]:
    total: collections.Counter[str] = collections.Counter()
    for c in counters:
        total.update(c)
    return _counts(total)


def network_precision_summary(network: Any) -> dict[str, Any]:
    """Dtypes in a parsed network: layer outputs, layer inputs, constants (weights) and MatMul/Conv inputs.

    Weight-only INT4 shows up only as a constant and a DEQUANTIZE input, never as a compute output, so a
    precision is "present" when any of these counts has it (``dtypes``).
    """
    outputs: collections.Counter[str] = collections.Counter()
    inputs: collections.Counter[str] = collections.Counter()
    weights: collections.Counter[str] = collections.Counter()
    compute: collections.Counter[str] = collections.Counter()
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = getattr(layer.type, "name", str(layer.type))
        for j in range(layer.num_outputs):
            dtype = tb.dtype_name(layer.get_output(j).dtype)
            (weights if kind == "CONSTANT" else outputs)[dtype] += 1
        for j in range(layer.num_inputs):
            tensor = layer.get_input(j)
            if tensor is not None:  # optional inputs are None
                inputs[tb.dtype_name(tensor.dtype)] += 1
        if kind in ("MATRIX_MULTIPLY", "CONVOLUTION", "DECONVOLUTION") and layer.num_inputs:
            compute[tb.dtype_name(layer.get_input(0).dtype)] += 1
    return {"layers": network.num_layers, "output_dtypes": _counts(outputs), "input_dtypes": _counts(inputs),
            "weight_dtypes": _counts(weights), "matmul_conv_input_dtypes": _counts(compute),
            "dtypes": _all_dtypes(outputs, inputs, weights)}


_DTYPE_WORDS = [("bf16", "bf16"), ("bfloat16", "bf16"), ("fp16", "fp16"), ("half", "fp16"), ("fp32", "fp32"),
                ("float", "fp32"), ("fp8", "fp8"), ("e4m3", "fp8"), ("int8", "int8"), ("fp4", "fp4"),
                ("e2m1", "fp4"), ("int4", "int4"), ("int32", "int32"), ("int64", "int64"), ("bool", "bool"),
                ("uint8", "uint8"), ("e8m0", "e8m0")]


def _inspector_dtype(text: str) -> str:
    """Dtype from an inspector field: "Half" (no execution context) or "Row major linear FP16 format" (with one)."""
    lowered = text.lower()
    for word, name in _DTYPE_WORDS:
        if re.search(rf"\b{word}\b", lowered):
            return name
    return lowered or "unknown"


def inspector_precision_summary(info: dict[str, Any]) -> dict[str, Any]:
    """Dtypes of the engine inspector's JSON: layer outputs, inputs and weights ("Weights": {"Type": ...})."""
    layers = info.get("Layers", [])
    outputs: collections.Counter[str] = collections.Counter()
    inputs: collections.Counter[str] = collections.Counter()
    weights: collections.Counter[str] = collections.Counter()
    fused = 0
    for layer in layers:
        if isinstance(layer, str):  # ProfilingVerbosity below DETAILED: names only
            return {"layers": len(layers), "output_dtypes": {}, "dtypes": {},
                    "note": "engine has layer names only (no detail)"}
        for out in layer.get("Outputs", []):
            outputs[_inspector_dtype(str(out.get("Format/Datatype") or out.get("DataType", "")))] += 1
        for inp in layer.get("Inputs", []):
            inputs[_inspector_dtype(str(inp.get("Format/Datatype") or inp.get("DataType", "")))] += 1
        for key in ("Weights", "Bias"):
            if isinstance(layer.get(key), dict) and layer[key].get("Type"):
                weights[_inspector_dtype(str(layer[key]["Type"]))] += 1
        fused += "ForeignNode" in str(layer.get("Name", "")) or str(layer.get("LayerType", "")) == "Myelin"
    return {"layers": len(layers), "output_dtypes": _counts(outputs), "input_dtypes": _counts(inputs),
            "weight_dtypes": _counts(weights), "fused_blocks": fused, "dtypes": _all_dtypes(outputs, inputs, weights)}


def engine_precision_summary(engine: bytes | memoryview | str | os.PathLike,
                             backend: str = "auto") -> dict[str, Any] | None:
    """Dtypes from the engine inspector; None (reason logged) where the engine cannot be deserialised."""
    count, reason = tb.cuda_device_count()
    if count == 0:
        logger.info("engine precision summary skipped: %s; engines deserialise only on a GPU", reason)
        return None
    data = Path(engine).read_bytes() if isinstance(engine, (str, os.PathLike)) else engine
    trt, _info = tb.import_tensorrt(backend)
    trt_logger = tb.make_logger(trt)
    _runtime, eng = tb.deserialize_engine(trt, data, trt_logger)
    if eng is None:
        logger.warning("engine precision summary skipped: TensorRT could not deserialise the engine (%s)",
                       "; ".join(trt_logger.errors[-2:]) or "no message")
        return None
    return inspector_precision_summary(
        json.loads(eng.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)))


def precision_warning(precision: str, summary: dict[str, Any] | None, what: str = "engine") -> str | None:
    """The original toolkit's warning when the requested precision is absent from an engine (or network).

    Present means: in any layer output, layer input or weight (``dtypes``; ``output_dtypes`` for old reports).
    """
    if precision == "fp32" or not summary:
        return None
    seen = summary.get("dtypes") or summary.get("output_dtypes")
    if not seen or precision in seen:
        return None
    p = precision.upper()
    return f"{p} requested but {what} contains no {p} tensors; TensorRT likely fell back to {_FALLBACK[precision]}."


# ------------------------------------------------------------------------------------------ timing cache
def _cache_entries(cache: Any) -> int | None:
    """Entries in an ITimingCache (``queryKeys``); None where this TensorRT cannot tell."""
    query = getattr(cache, "queryKeys", None)
    return len(query()) if callable(query) else None


def timing_cache_key(info: tb.BackendInfo) -> str:
    """Who may reuse a timing cache: the same TensorRT module and version on the same GPU model."""
    gpu = tb.cuda_gpu(0)
    return f"{info.cache_key}|{gpu['name']}|sm{gpu['compute_capability']}" if gpu else f"{info.cache_key}|no-gpu"


def cache_lock(path: Path) -> Any:
    """An inter-process lock beside the cache (``<cache>.lock``), held while reading or merging and writing."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path.with_name(path.name + ".lock")), timeout=600)


def load_timing_cache(config: Any, path: str | os.PathLike, info: tb.BackendInfo) -> tuple[Any, dict[str, Any]]:
    """Attach a timing cache to ``config``: the one at ``path`` when it belongs to this TensorRT, else a new one.

    ``loaded`` is true only when TensorRT really took entries from the file: it returns an empty cache
    (logging only a warning) for a blob it cannot deserialise.
    """
    p = Path(path)
    key = timing_cache_key(info)
    with cache_lock(p):
        data, reason = cache_files.read_keyed(p, key)
    status: dict[str, Any] = {"path": str(p), "key": key, "loaded": False, "loaded_bytes": 0,
                              "reason": reason}
    cache = config.create_timing_cache(data or b"")
    if data is not None:
        entries = _cache_entries(cache)
        status["entries"] = entries
        if entries == 0:
            status["reason"] = ("TensorRT returned an empty cache (it could not deserialise the file, or it had "
                                "no entries)")
        else:
            status.update(loaded=True, loaded_bytes=len(data), reason="" if entries else "entry count unknown")
    if not config.set_timing_cache(cache, False):
        status.update(loaded=False, reason="TensorRT refused the cache (device mismatch); starting a new one")
        cache = config.create_timing_cache(b"")
        if not config.set_timing_cache(cache, False):
            raise BuildError("TensorRT refused a new, empty timing cache")
    if data is None and p.exists():
        logger.warning("timing cache %s ignored: %s", p, reason)
    logger.info("timing cache %s: %s", p, "loaded" if status["loaded"] else f"new ({status['reason']})")
    return cache, status


def save_timing_cache(config: Any, path: str | os.PathLike, info: tb.BackendInfo, status: dict[str, Any]) -> None:
    """Merge a cache another build wrote meanwhile, then write cache and sidecar atomically (cache first)."""
    p = Path(path)
    key = timing_cache_key(info)
    cache = config.get_timing_cache()
    with cache_lock(p):
        other, _ = cache_files.read_keyed(p, key)
        if other is not None:  # entries another build saved meanwhile (duplicates are skipped by TensorRT)
            status["merged"] = bool(cache.combine(config.create_timing_cache(other), False))
        blob = bytes(memoryview(cache.serialize()))
        cache_files.write_keyed(p, blob, key, {"backend": info.name, "version": info.version})
    status.update(saved=True, saved_bytes=len(blob))
    logger.info("timing cache saved: %s (%d bytes, key %s)", p, len(blob), key)


# ------------------------------------------------------------------------------------ argument checking
def parse_compute_capability(value: Any) -> int:
    """"8.9", "sm89", "SM_120", 89, (8, 9) -> 89; "current" -> 0 (the GPU of this machine)."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        return int(value[0]) * 10 + int(value[1])
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().replace("sm_", "").replace("sm", "")
    if text == "current":
        return 0
    match = re.fullmatch(r"(\d+)\.(\d)|(\d{2,3})", text)
    if not match:
        raise InputError(f"cannot read compute capability {value!r}; use e.g. 8.9, sm89 or current")
    return int(match.group(1)) * 10 + int(match.group(2)) if match.group(1) else int(match.group(3))


def resolve_compute_capabilities(trt: Any, info: tb.BackendInfo, precision: str,
                                 requested: Sequence[Any] | None) -> list[int] | None:
    """Validate targets before building; default: portable (None), or SM89+SM120 for fp8 on TensorRT-RTX."""
    if not info.is_rtx:
        if requested:
            raise InputError("compute capability targets are a TensorRT-RTX feature; "
                             f"{info.name} builds for the GPU it runs on")
        return None
    if not requested:
        if precision == "fp8":
            logger.info("fp8 needs compute capability 8.9 or 12.0 (FP8 tensor cores): building for SM89 and SM120; "
                        "the default portable targets include SM80/SM86, which have no FP8")
            return list(FP8_TARGETS)
        logger.info("no compute capability targets given: TensorRT-RTX default portable targets "
                    "(SM80, SM86, SM89, SM120 and later)")
        return None
    targets = [parse_compute_capability(v) for v in requested]
    if 0 in targets and len(targets) > 1:
        raise InputError(f"compute capability 'current' must be the only target, got {list(requested)}: TensorRT-RTX "
                         "builds CURRENT alone; list explicit targets (e.g. 8.9 12.0) for a multi-GPU engine")
    known = tb.supported_compute_capabilities(trt)
    for sm in targets:
        if sm == 0:
            count, reason = tb.cuda_device_count()
            if count == 0:
                raise InputError(f"compute capability 'current' needs a GPU on this machine: {reason}")
        elif sm not in known:
            raise InputError(f"{info.name} {info.version} cannot target SM{sm}; it knows "
                             + ", ".join(f"SM{k}" for k in known))
        elif sm in _UNSUPPORTED.get(precision, ()):
            raise InputError(f"{precision} cannot run on SM{sm} ({sm // 10}.{sm % 10}); "
                             f"{precision} needs " + ("SM89 or SM120" if precision == "fp8" else "SM80 or newer"))
        elif sm == 75 and precision == "fp32":
            logger.warning("TensorRT-RTX has no FP32 GEMM on Turing (SM75): fp32 MatMul layers will fail to build")
    return targets


def _validate(onnx_path: Path, engine_path: Path, precision: str, workspace_gb: float, opt_level: int,
              max_aux_streams: int) -> None:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if not onnx_path.is_file():
        raise InputError(f"ONNX file not found: {onnx_path}")
    try:
        engine_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the engine directory {engine_path.parent}: {exc}") from exc
    if not os.access(engine_path.parent, os.W_OK):
        raise InputError(f"engine directory is not writable: {engine_path.parent}")
    if workspace_gb <= 0:
        raise InputError(f"workspace must be positive, got {workspace_gb} GB")
    if not 0 <= opt_level <= 5:
        raise InputError(f"optimisation level must be 0..5, got {opt_level}")
    if max_aux_streams < -1:
        raise InputError(f"max_aux_streams must be >= 0 (or -1 for TensorRT's default), got {max_aux_streams}")


def _check_profile(network: Any, profile: Mapping[str, Any], onnx_p: Path) -> dict[str, tuple[tuple[int, ...], ...]]:
    """The profile's shapes, checked against the network inputs: every dynamic input needs one, and they must
    agree with the fixed axes."""
    inputs = {network.get_input(i).name: tuple(network.get_input(i).shape) for i in range(network.num_inputs)}
    unknown = sorted(set(profile) - set(inputs))
    if unknown:
        raise InputError(f"optimisation profile names {unknown}, but {onnx_p.name} has inputs {sorted(inputs)}")
    dynamic = sorted(n for n, shape in inputs.items() if any(d < 0 for d in shape))
    missing = [n for n in dynamic if n not in profile]
    if missing:
        raise InputError(f"{onnx_p.name}: inputs {missing} have dynamic axes ({[list(inputs[n]) for n in missing]}); "
                         "give their (min, opt, max) shapes as an optimisation profile")
    shapes = {}
    for name, mmo in profile.items():
        shapes[name] = tuple(tuple(int(d) for d in s) for s in mmo)
        for s in shapes[name]:
            if len(s) != len(inputs[name]) or any(f >= 0 and f != d for f, d in zip(inputs[name], s)):
                raise InputError(f"optimisation profile shape {list(s)} for {name} does not fit {onnx_p.name}'s "
                                 f"input shape {list(inputs[name])} (-1: dynamic)")
    return shapes


# ------------------------------------------------------------------------------------------------- build
def build_engine(
    onnx_path: str | os.PathLike,
    engine_path: str | os.PathLike,
    precision: str,
    *,
    backend: str = "auto",
    workspace_gb: float = 32,
    opt_level: int = 5,
    max_aux_streams: int = 4,
    timing_cache_path: str | os.PathLike | None = None,
    compute_capabilities: Sequence[Any] | None = None,
    calibrator: Any = None,
    strongly_typed: bool | None = None,
    strict: bool = False,
    profile: Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]] | None = None,
) -> BuildResult:
    """Parse ``onnx_path``, build a ``precision`` engine and write it atomically to ``engine_path``.

    ``strongly_typed=None`` picks strong typing where the module has nothing else (TensorRT >= 11,
    TensorRT-RTX) and the legacy weakly typed path with precision flags on TensorRT 10. ``strict`` turns
    "requested precision absent from the parsed network" into BuildError; the same check on the built engine
    stays a warning (fused blocks hide inner types). An existing engine is replaced only on success.
    ``profile`` (input name -> (min, opt, max) shapes) is required for, and only for, inputs with dynamic axes.
    Ctrl-C during the build cancels it and raises KeyboardInterrupt; no engine is written (``tb.BuildInterrupt``).
    """
    t_start = time.perf_counter()
    onnx_p, engine_p = Path(onnx_path), Path(engine_path)
    _validate(onnx_p, engine_p, precision, workspace_gb, opt_level, max_aux_streams)
    trt, info = tb.import_tensorrt(backend)
    strong = info.strongly_typed_only if strongly_typed is None else bool(strongly_typed)
    if info.strongly_typed_only and not strong:
        raise InputError(f"{info.name} {info.version} builds strongly typed networks only")
    if calibrator is not None and (strong or precision != "int8"):
        raise InputError("an INT8 calibrator works only on the weakly typed TensorRT 10 path with precision int8; "
                         f"{info.name} {info.version} needs a Q/DQ graph (explicit quantisation) instead")
    targets = resolve_compute_capabilities(trt, info, precision, compute_capabilities)
    if not info.is_rtx and tb.cuda_device_count()[0] == 0:
        raise BuildError(f"{info.name} needs a GPU to build engines ({tb.cuda_device_count()[1]}); "
                         "TensorRT-RTX (`pip install tensorrt-rtx-cu13`) builds without one")
    # an engine of full TensorRT (or a CURRENT TensorRT-RTX build) runs on GPUs like the one it was built on
    target_gpu = tb.cuda_gpu(0) if (not info.is_rtx or targets == [0]) else None
    result = BuildResult(engine_path=str(engine_p), onnx_path=str(onnx_p), precision=precision, backend=info.name,
                         backend_version=info.version, typing="strong" if strong else "weak",
                         settings={"workspace_gb": workspace_gb, "opt_level": opt_level,
                                   "max_aux_streams": max_aux_streams},
                         compute_capabilities=[f"SM{t}" if t else "CURRENT" for t in targets] if targets else None,
                         target_gpu=target_gpu)
    logger.info("building %s %s engine from %s with %s %s (%s typing%s)", precision, engine_p.name, onnx_p.name,
                info.name, info.version, result.typing,
                "" if strong else ": legacy weakly typed path with builder precision flags")

    trt_logger = tb.make_logger(trt)
    builder = trt.Builder(trt_logger)
    network = tb.create_network(trt, builder, info, strong)
    parser = trt.OnnxParser(network, trt_logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_p)):
        errors = tb.parser_errors(parser) or trt_logger.errors or ["no parser message"]
        raise BuildError(f"TensorRT could not parse {onnx_p} ({len(errors)} errors): " + " | ".join(errors[:10]))
    result.parse_seconds = round(time.perf_counter() - t0, 3)
    result.network_precision = network_precision_summary(network)
    logger.info("parsed %s in %.2f s: %d layers, output dtypes %s", onnx_p.name, result.parse_seconds,
                network.num_layers, result.network_precision["output_dtypes"])
    if strong:  # the graph itself must carry the precision
        msg = precision_warning(precision, result.network_precision, "the parsed network")
        if msg:
            msg += " In a strongly typed build the ONNX types decide: cast or quantise the graph first."
            if strict:
                raise BuildError(msg)
            logger.warning("%s", msg)
            result.warnings.append(msg)

    config = builder.create_builder_config()
    skipped = result.skipped_settings
    tb.set_workspace(trt, config, int(workspace_gb * (1 << 30)), skipped)
    tb.set_config(config, "builder_optimization_level", opt_level, skipped)
    if max_aux_streams >= 0:
        tb.set_config(config, "max_aux_streams", max_aux_streams, skipped)
    shapes = _check_profile(network, profile or {}, onnx_p)
    if shapes:
        opt_profile = tb.add_optimization_profile(builder, config, shapes)
        result.profile = {name: dict(zip(("min", "opt", "max"), (list(s) for s in mmo))) for name, mmo in shapes.items()}
        logger.info("optimisation profile: %s", "; ".join(f"{n} min {v['min']} opt {v['opt']} max {v['max']}"
                                                           for n, v in result.profile.items()))
        if calibrator is not None:
            tb.set_config(config, "calibration_profile", opt_profile, skipped)
    if hasattr(trt, "ProfilingVerbosity"):  # per-layer detail for the engine inspector
        tb.set_config(config, "profiling_verbosity", trt.ProfilingVerbosity.DETAILED, skipped)
    interrupt = tb.BuildInterrupt()
    monitor = tb.make_progress_monitor(trt, interrupt.is_requested)
    if monitor is not None:
        tb.set_config(config, "progress_monitor", monitor, skipped, check=False)
    if not strong:
        result.flags = tb.set_precision_flags(trt, config, info, precision)
        if calibrator is not None:
            tb.set_config(config, "int8_calibrator", calibrator, skipped, check=False)
    if targets:
        tb.set_compute_capabilities(trt, config, targets, trt_logger)
    cache_status: dict[str, Any] = {}
    if timing_cache_path is not None and info.is_rtx:
        result.timing_cache = {"path": str(timing_cache_path), "loaded": False, "saved": False,
                               "reason": "TensorRT-RTX ignores timing caches (no-ops since TensorRT-RTX 1.2)"}
        logger.info("timing cache skipped: %s", result.timing_cache["reason"])
    elif timing_cache_path is not None and not hasattr(config, "create_timing_cache"):
        result.timing_cache = {"path": str(timing_cache_path), "loaded": False, "saved": False,
                               "reason": "IBuilderConfig.create_timing_cache does not exist in this TensorRT"}
        logger.info("timing cache skipped: %s", result.timing_cache["reason"])
    elif timing_cache_path is not None:
        _cache, cache_status = load_timing_cache(config, timing_cache_path, info)

    t0 = time.perf_counter()
    logger.info("TensorRT build of %s started", engine_p.name)
    with atomic_path(engine_p) as tmp:
        with warnings.catch_warnings(), interrupt.armed():
            warnings.simplefilter("ignore", DeprecationWarning)
            built = _build_to_file(trt, builder, network, config, tmp)
        result.build_seconds = round(time.perf_counter() - t0, 3)
        interrupt.raise_if_requested()
        if not built:
            errors = trt_logger.errors or ["no error message from TensorRT"]
            raise BuildError(f"TensorRT could not build {engine_p.name} from {onnx_p.name} after "
                             f"{result.build_seconds:.1f} s: " + " | ".join(errors[-10:]))
        if cache_status:
            save_timing_cache(config, timing_cache_path, info, cache_status)
            result.timing_cache = cache_status
        del parser, network  # the parsed weights: not needed to inspect or keep the engine
        _inspect_engine(result, tmp, precision, info.name)
    result.engine_bytes = engine_p.stat().st_size
    logger.info("built %s in %.1f s (%.1f MB)", engine_p, result.build_seconds, result.engine_bytes / 1e6)
    result.total_seconds = round(time.perf_counter() - t_start, 3)
    return result


def _build_to_file(trt: Any, builder: Any, network: Any, config: Any, path: Path) -> bool:
    """Build and write the serialised engine to ``path``; streamed to the file where the builder can
    (``build_serialized_network_to_stream``: the plan never sits whole in host memory), else via host memory."""
    with open(path, "wb") as f:
        if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):
            writer = _file_writer(trt, f)
            built = bool(builder.build_serialized_network_to_stream(network, config, writer))
            if writer.error is not None:  # e.g. disk full: the cause, not "could not build"
                raise writer.error
            return built
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            return False
        f.write(memoryview(plan))
        return True


def _file_writer(trt: Any, f: Any) -> Any:
    """An ``IStreamWriter`` of module ``trt`` that appends what TensorRT hands it to the open file ``f``."""
    class FileWriter(trt.IStreamWriter):
        def __init__(self) -> None:
            trt.IStreamWriter.__init__(self)
            self.error: OSError | None = None

        def write(self, data: Any) -> int:  # a TensorRT callback: keep the error, return 0 (failure), never raise
            try:
                return f.write(data)
            except OSError as exc:
                self.error = self.error or exc
                return 0
    return FileWriter()


def _inspect_engine(result: BuildResult, path: Path, precision: str, backend: str) -> None:
    """Engine precision summary (GPU only) and the advisory precision warning, from the written engine."""
    count, reason = tb.cuda_device_count()
    result.engine_precision = engine_precision_summary(path, backend=backend) if count else None
    if result.engine_precision is None:
        result.engine_precision_note = f"engine not inspected: {reason or 'TensorRT could not deserialise it'}"
        logger.info("%s", result.engine_precision_note)
    msg = precision_warning(precision, result.engine_precision)
    if msg:  # advisory, also under --strict: fused Myelin blocks hide inner types (not yet verified on a GPU)
        msg += " (engine inspection, advisory: fused blocks can hide the requested type)"
        logger.warning("%s", msg)
        result.warnings.append(msg)
