"""TensorRT / TensorRT-RTX engine runner: checks that an engine can run here, then I/O as torch CUDA tensors.

The only runner that touches TensorRT, always through :mod:`vggt_trt.trt.backend`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError, MissingDependencyError
from ..trt import backend as tb
from ..trt import cache_files
from .base import Runner, RuntimeUnavailableError, TensorMeta, dims

logger = logging.getLogger(__name__)

# Host dtype of the feeds for each engine I/O type (bf16 / fp8 are converted on the device by torch)
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "bf16": np.float32, "fp8": np.float32, "int8": np.int8,
              "int32": np.int32, "int64": np.int64, "bool": np.bool_, "uint8": np.uint8}
# Engine I/O types torch cannot hold (packed 4-bit, scale exponents): such an engine needs other I/O types
_NO_TORCH_DTYPE = ("int4", "fp4", "e8m0")


def cuda_compute_capability(index: int = 0) -> tuple[int, int] | None:
    """(major, minor) of CUDA device ``index`` through the driver API (no toolkit needed); None without a GPU."""
    gpu = tb.cuda_gpu(index)
    return tb.cc_tuple(gpu["compute_capability"]) if gpu else None


def cuda_index(device: str) -> int:
    """The CUDA device index a torch-style device string names: "cuda:1" -> 1; "auto", "cuda" -> 0."""
    head, _, index = str(device).partition(":")
    if head not in ("auto", "cuda") or (index and not index.isdigit()):
        raise InputError(f"TensorRT engines run on a CUDA device; got device {device!r} (use cuda or cuda:N)")
    return int(index or 0)


def build_report(engine_path: str | os.PathLike) -> dict[str, Any] | None:
    """The build stage of the report beside an engine (``<stem>_<prec>.json``), if one exists and parses."""
    import json

    report = Path(engine_path).with_suffix(".json")
    if not report.is_file():
        return None
    try:
        doc = json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        logger.debug("cannot read build report %s: %s", report, exc)
        return None
    build = doc.get("stages", {}).get("build", doc) if isinstance(doc, Mapping) else None
    return build if isinstance(build, Mapping) else None


def _target_problem(report: Mapping[str, Any] | None, gpu: Mapping[str, Any]) -> str | None:
    """Why the report's build targets exclude this GPU; None when they include it or are unknown (portable)."""
    if not report:
        return None
    cc = gpu["compute_capability"]
    sm = "SM" + cc.replace(".", "")
    targets = report.get("compute_capabilities") or []
    built_on = (report.get("target_gpu") or {}).get("compute_capability")
    if targets and "CURRENT" not in targets and sm not in targets:
        return (f"it was built for {', '.join(targets)} and this GPU ({gpu['name']}) is compute capability {cc}: "
                f"rebuild it with --compute-capability {cc} (or add {cc} to the targets)")
    if built_on and built_on != cc and ("CURRENT" in targets or not targets):
        return (f"it was built for the build machine's GPU (compute capability {built_on}) and this GPU "
                f"({gpu['name']}) is {cc}: rebuild it on this machine")
    return None


def check_engine_can_run(engine_path: str | os.PathLike, info: Any, trt: Any = None,
                         device_index: int = 0) -> dict[str, Any]:
    """Raise RuntimeUnavailableError when the engine cannot run on GPU ``device_index``, saying exactly why.

    Checked before deserialising: the TensorRT that built it (build report), a GPU at that index, the
    backend's supported compute capabilities, and the report's build targets. Returns the GPU's facts.
    """
    path = Path(engine_path)
    report = build_report(path)
    built_by, built_version = (report or {}).get("backend"), (report or {}).get("backend_version")
    if built_by and built_by != info.name:
        raise RuntimeUnavailableError(f"{path.name} was built by {built_by} {built_version}, but {info.name} "
                                      f"{info.version} is the TensorRT here; engines only load in the TensorRT that "
                                      "built them: rebuild it here (vggt_to_trt.py) or install that TensorRT")
    count, reason = tb.cuda_device_count()
    if count == 0:
        raise RuntimeUnavailableError(f"cannot run {path.name}: TensorRT engines run only on an NVIDIA GPU and "
                                      f"this machine has none ({reason})")
    gpu = tb.cuda_gpu(device_index)
    if gpu is None:
        raise RuntimeUnavailableError(f"cannot run {path.name} on CUDA device {device_index}: this machine has "
                                      f"{count} GPU(s), indices 0..{count - 1}")
    if trt is None and info.is_rtx:  # its supported targets come from the module itself
        trt, _ = tb.import_tensorrt("tensorrt-rtx")
    problem = tb.unsupported_gpu_reason(trt, info, gpu["compute_capability"])
    if problem:
        raise RuntimeUnavailableError(f"cannot run {path.name} on GPU {device_index} ({gpu['name']}): {problem}")
    problem = _target_problem(report, gpu)
    if problem:
        raise RuntimeUnavailableError(f"cannot run {path.name} on GPU {device_index}: {problem}")
    if built_by == info.name and built_version and built_version != info.version:
        logger.warning("%s was built by %s %s; this is %s: it will likely fail to deserialise",
                       path.name, built_by, built_version, info.version)
    return gpu


def load_failure_message(path: Path, info: Any, validity: Mapping[str, Any] | None, errors: list[str],
                         report: Mapping[str, Any] | None, gpu: Mapping[str, Any] | None) -> str:
    """Why an engine did not deserialise: TensorRT-RTX's validity reasons, the build targets, TensorRT's own log."""
    parts = [f"{info.name} {info.version} cannot deserialise {path.name}"]
    if validity and validity.get("reasons"):
        parts.append("engine validity check: " + "; ".join(
            f"{r}: {a}" for r, a in zip(validity["reasons"], validity["advice"])))
    elif validity:
        parts.append(f"engine validity check: {validity.get('validity')} without a reason")
    problem = _target_problem(report, gpu) if gpu else None
    if problem:
        parts.append(problem)
    if report:
        parts.append(f"build report: {report.get('backend')} {report.get('backend_version')}, targets "
                     f"{report.get('compute_capabilities') or 'default'}")
    else:
        parts.append("no build report beside the engine to compare targets and versions with")
    parts.append("TensorRT says: " + (" | ".join(errors[-3:]) or "nothing"))
    return ". ".join(parts)


class TrtRunner(Runner):
    """A serialised TensorRT / TensorRT-RTX engine, I/O as torch CUDA tensors, ``execute_async_v3`` on a stream.

    ``trt_backend="auto"`` loads the TensorRT named by the engine's build report, else tries ``tensorrt``
    then ``tensorrt_rtx``. On TensorRT-RTX the kernels compiled just in time go to a runtime cache beside
    the engine (:func:`vggt_trt.trt.cache_files.runtime_cache_path`), loaded on activation and saved on
    deactivation; ``runtime_cache=False`` turns it off.
    """

    backend = "engine"

    def __init__(self, path: str | os.PathLike, trt_backend: str = "auto", device_index: int = 0,
                 runtime_cache: bool = True) -> None:
        super().__init__(f"engine:{Path(path).name}")
        self.path, self.trt_backend, self.device_index = Path(path), trt_backend, device_index
        self.use_runtime_cache = runtime_cache
        self.timing_method = "cuda-events"
        self._trt: Any = None
        self.engine: Any = None
        self.context: Any = None
        self._runtime: Any = None
        self._runtime_config: Any = None
        self._runtime_cache: Any = None
        self.runtime_cache_status: dict[str, Any] = {"used": False, "reason": "not activated"}
        self.weights_bytes: int = 0
        self.weights_method = ""
        self._outputs: dict[str, Any] = {}

    def _import(self) -> tuple[Any, Any]:
        backend = self.trt_backend
        if backend == "auto":
            built_by = (build_report(self.path) or {}).get("backend")
            if built_by in tb.BACKENDS:
                logger.info("%s: build report names %s; loading that", self.path.name, built_by)
                backend = built_by
        return tb.import_tensorrt(backend)

    def activate_impl(self) -> None:
        if not self.path.is_file():
            raise InputError(f"engine file not found: {self.path}")
        trt, info = self._import()
        self._trt, self.trt_info = trt, info
        gpu = check_engine_can_run(self.path, info, trt, self.device_index)
        try:
            import torch
        except ImportError as exc:
            raise MissingDependencyError("the TensorRT runner keeps I/O in torch CUDA tensors: install torch "
                                         "with CUDA") from exc
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"torch {torch.__version__} has no CUDA support here; the TensorRT runner "
                                          "needs a CUDA build of torch for its device buffers")
        torch.cuda.set_device(self.device_index)
        self.device, self.gpu = f"cuda:{self.device_index}", gpu
        trt_logger = tb.make_logger(trt)
        validity = tb.engine_validity(trt, self.path, trt_logger)
        if validity and validity["validity"] == "INVALID" and validity["reasons"]:
            raise RuntimeUnavailableError(load_failure_message(self.path, info, validity, validity["log"],
                                                               build_report(self.path), gpu))
        if validity and validity["validity"] == "SUBOPTIMAL":
            logger.warning("%s: TensorRT-RTX says the engine is valid here but may run slower than one built for "
                           "this GPU (%s)", self.path.name, gpu["name"])
        data = self.path.read_bytes()
        free_before = torch.cuda.mem_get_info()[0]
        self._runtime, self.engine = tb.deserialize_engine(trt, data, trt_logger)
        if self.engine is None:
            raise RuntimeUnavailableError(load_failure_message(self.path, info, validity, trt_logger.errors,
                                                               build_report(self.path), gpu))
        stat = tb.engine_weight_bytes(trt, self.engine)
        if stat is not None:
            self.weights_bytes, self.weights_method = stat, "get_engine_stat(TOTAL_WEIGHTS_SIZE)"
        else:
            self.weights_bytes = max(0, free_before - torch.cuda.mem_get_info()[0])
            self.weights_method = "free device memory before - after deserialising"
        self._open_context(info, gpu, data)
        if self.context is None:
            raise RuntimeUnavailableError(f"cannot create an execution context for {self.path.name}: "
                                          + (" | ".join(trt_logger.errors[-3:]) or "out of device memory?"))
        logger.info("%s: weights %.1f MB on the device (%s); runtime cache %s", self.path.name,
                    self.weights_bytes / 2**20, self.weights_method, self.runtime_cache_status)
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        for name in names:
            dtype = tb.dtype_name(self.engine.get_tensor_dtype(name))
            if dtype in _NO_TORCH_DTYPE:
                raise InputError(f"{self.path.name}: I/O tensor {name!r} is {dtype}, which torch cannot hold; "
                                 "rebuild with fp32/fp16 graph inputs and outputs (quantise inside the graph)")
        self._inputs_meta = [self._meta(n) for n in names if is_input[n]]
        self._output_names = [n for n in names if not is_input[n]]

    def _open_context(self, info: Any, gpu: Mapping[str, Any], data: bytes) -> None:
        """The execution context; on TensorRT-RTX with the runtime cache beside the engine (when it fits)."""
        import hashlib

        if not (info.is_rtx and self.use_runtime_cache):
            self.context = self.engine.create_execution_context()
            self.runtime_cache_status = {"used": False, "reason": "turned off" if info.is_rtx else
                                         f"{info.name} compiles no kernels at run time"}
            return
        self._cache_path = cache_files.runtime_cache_path(self.path, gpu["compute_capability"])
        self._cache_key = cache_files.runtime_cache_key(info.name, info.version, hashlib.sha256(data).hexdigest(),
                                                        gpu)
        blob, reason = cache_files.read_keyed(self._cache_path, self._cache_key)
        if blob is None and self._cache_path.exists():
            logger.info("runtime cache %s not used: %s", self._cache_path.name, reason)
        self.context, self._runtime_config, self._runtime_cache, self.runtime_cache_status = \
            tb.create_context(self.engine, blob)
        self.runtime_cache_status["path"] = str(self._cache_path)

    def save_runtime_cache(self) -> bool:
        """Write the runtime cache beside the engine when it holds more than what was loaded; True if written."""
        if self._runtime_cache is None:
            return False
        blob = tb.serialize_runtime_cache(self._runtime_cache)
        if not blob or len(blob) == self.runtime_cache_status.get("loaded_bytes"):
            return False
        cache_files.write_keyed(self._cache_path, blob, self._cache_key,
                                {"engine": self.path.name, "gpu": self.gpu})
        self.runtime_cache_status.update(saved=True, saved_bytes=len(blob))
        logger.info("runtime cache saved: %s (%d bytes)", self._cache_path, len(blob))
        return True

    def _meta(self, name: str) -> TensorMeta:
        dtype = tb.dtype_name(self.engine.get_tensor_dtype(name))
        shape = dims(tuple(self.engine.get_tensor_shape(name)))
        profile = tb.profile_shapes(self.engine, name) if None in shape else None
        return TensorMeta(name, shape, np.dtype(_NP_DTYPES.get(dtype, np.float32)).name, *(profile or ()))

    def deactivate_impl(self) -> None:
        try:
            self.save_runtime_cache()
        except OSError as exc:  # a cache that cannot be written costs only compile time next run
            logger.warning("runtime cache not saved: %s", exc)
        self._outputs.clear()
        self.context = self._runtime_cache = self._runtime_config = None
        self.engine = self._runtime = None

    def input_metadata_impl(self) -> list[TensorMeta]:
        return list(self._inputs_meta)

    def output_names_impl(self) -> list[str]:
        return list(self._output_names)

    def activation_bytes(self) -> int:
        """Activation memory the engine asks TensorRT to allocate (excludes I/O buffers and weights)."""
        for attr in ("device_memory_size_v2", "device_memory_size"):
            if hasattr(self.engine, attr):
                return int(getattr(self.engine, attr))
        return 0

    def device_memory_bytes(self) -> int:
        """Device memory TensorRT holds outside torch's allocator: engine weights plus activations."""
        return self.weights_bytes + self.activation_bytes()

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import torch

        torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
                        "fp8": torch.float8_e4m3fn, "int8": torch.int8, "int32": torch.int32, "int64": torch.int64,
                        "bool": torch.bool, "uint8": torch.uint8}
        keep = []  # device inputs must outlive the launch
        with torch.cuda.stream(self.stream):
            for meta in self._inputs_meta:
                dtype = torch_dtypes[tb.dtype_name(self.engine.get_tensor_dtype(meta.name))]
                value = torch.as_tensor(np.ascontiguousarray(feeds[meta.name])).to(self.device, dtype,
                                                                                    non_blocking=True)
                if not self.context.set_input_shape(meta.name, tuple(value.shape)):
                    raise InputError(f"{self.path.name}: input {meta.name!r} shape {list(value.shape)} is outside "
                                     "the engine's optimisation profile")
                self.context.set_tensor_address(meta.name, value.data_ptr())
                keep.append(value)
            outputs = {}
            for name in self._output_names:
                shape = tuple(self.context.get_tensor_shape(name))
                dtype = torch_dtypes[tb.dtype_name(self.engine.get_tensor_dtype(name))]
                buf = self._outputs.get(name)
                if buf is None or tuple(buf.shape) != shape or buf.dtype != dtype:
                    buf = self._outputs[name] = torch.empty(shape, dtype=dtype, device=self.device)
                self.context.set_tensor_address(name, buf.data_ptr())
                outputs[name] = buf
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(self.stream)
            ok = self.context.execute_async_v3(self.stream.cuda_stream)
            end.record(self.stream)
        end.synchronize()
        if not ok:
            raise RuntimeUnavailableError(f"TensorRT execute_async_v3 failed for {self.path.name}")
        self.last_inference_ms = start.elapsed_time(end)
        return {k: v.clone() for k, v in outputs.items()}

    def info(self) -> dict[str, Any]:
        extra = {"trt": getattr(self, "trt_info", None) and self.trt_info.to_dict(), "gpu": getattr(self, "gpu", None),
                 "weights_bytes": self.weights_bytes, "weights_method": self.weights_method,
                 "runtime_cache": self.runtime_cache_status}
        return {**super().info(), **extra}
