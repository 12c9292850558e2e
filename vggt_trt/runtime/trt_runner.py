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
from .base import Runner, RuntimeUnavailableError, TensorMeta, dims

logger = logging.getLogger(__name__)

# TensorRT-RTX runs on Turing, Ampere, Ada and Blackwell GPUs; not on Hopper (data-centre H100/H200)
RTX_UNSUPPORTED_CC = {(9, 0): "Hopper"}
_NP_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8, "int32": np.int32, "int64": np.int64,
              "bool": np.bool_, "uint8": np.uint8}


def cuda_compute_capability(index: int = 0) -> tuple[int, int] | None:
    """(major, minor) of CUDA device ``index`` through the driver API (no toolkit needed); None without a GPU."""
    import ctypes

    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    if lib.cuInit(0) != 0:
        return None
    dev, major, minor = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    if lib.cuDeviceGet(ctypes.byref(dev), index) != 0:
        return None
    lib.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    lib.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR
    return major.value, minor.value


def _build_report(engine_path: Path) -> dict[str, Any] | None:
    """The build report beside an engine (``<stem>_<prec>.json``), if one exists and parses."""
    import json

    report = engine_path.with_suffix(".json")
    if not report.is_file():
        return None
    try:
        return json.loads(report.read_text())
    except (OSError, ValueError) as exc:
        logger.debug("cannot read build report %s: %s", report, exc)
        return None


def _report_backend(report: Mapping[str, Any] | None) -> tuple[str | None, str | None]:
    """(module name, version) that built the engine, from a build report or a BuildResult dict."""
    if not report:
        return None, None
    build = report.get("stages", {}).get("build", report)
    if not isinstance(build, Mapping):
        return None, None
    return build.get("backend"), build.get("backend_version")


def check_engine_can_run(engine_path: str | os.PathLike, info: Any) -> None:
    """Raise RuntimeUnavailableError when the engine cannot run here, saying exactly why (before deserialising)."""
    path = Path(engine_path)
    built_by, built_version = _report_backend(_build_report(path))
    if built_by and built_by != info.name:
        raise RuntimeUnavailableError(f"{path.name} was built by {built_by} {built_version}, but {info.name} "
                                      f"{info.version} is the TensorRT here; engines only load in the TensorRT that "
                                      "built them: rebuild it here (vggt_to_trt.py) or install that TensorRT")
    count, reason = tb.cuda_device_count()
    if count == 0:
        raise RuntimeUnavailableError(f"cannot run {path.name}: TensorRT engines run only on an NVIDIA GPU and "
                                      f"this machine has none ({reason})")
    cc = cuda_compute_capability()
    if info.is_rtx and cc is not None:
        family = RTX_UNSUPPORTED_CC.get(cc) or ("pre-Turing" if cc < (7, 5) else None)
        if family:
            raise RuntimeUnavailableError(
                f"TensorRT-RTX {info.version} does not support this GPU: compute capability {cc[0]}.{cc[1]} "
                f"({family}, e.g. H100/H200). TensorRT-RTX runs on GeForce/RTX GPUs (Turing, Ampere, Ada, "
                "Blackwell); on this GPU build and run the engine with NVIDIA's `tensorrt` wheel instead")
    if built_by == info.name and built_version and built_version != info.version:
        logger.warning("%s was built by %s %s; this is %s: it will likely fail to deserialise",
                       path.name, built_by, built_version, info.version)


class TrtRunner(Runner):
    """A serialised TensorRT / TensorRT-RTX engine, I/O as torch CUDA tensors, ``execute_async_v3`` on a stream."""

    backend = "engine"

    def __init__(self, path: str | os.PathLike, trt_backend: str = "auto", device_index: int = 0) -> None:
        super().__init__(f"engine:{Path(path).name}")
        self.path, self.trt_backend, self.device_index = Path(path), trt_backend, device_index
        self.timing_method = "cuda-events"
        self._trt: Any = None
        self.engine: Any = None
        self.context: Any = None
        self._runtime: Any = None
        self._outputs: dict[str, Any] = {}

    def activate_impl(self) -> None:
        if not self.path.is_file():
            raise InputError(f"engine file not found: {self.path}")
        trt, info = tb.import_tensorrt(self.trt_backend)
        self._trt, self.trt_info = trt, info
        check_engine_can_run(self.path, info)
        try:
            import torch
        except ImportError as exc:
            raise MissingDependencyError("the TensorRT runner keeps I/O in torch CUDA tensors: install torch "
                                         "with CUDA") from exc
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError(f"torch {torch.__version__} has no CUDA support here; the TensorRT runner "
                                          "needs a CUDA build of torch for its device buffers")
        torch.cuda.set_device(self.device_index)
        self.device = f"cuda:{self.device_index}"
        trt_logger = tb.make_logger(trt)
        self._runtime, self.engine = tb.deserialize_engine(trt, self.path.read_bytes(), trt_logger)
        if self.engine is None:
            errors = " | ".join(trt_logger.errors[-3:]) or "no message from TensorRT"
            hint = ""
            if any(w in errors.lower() for w in ("version", "magic", "serializ", "mismatch")):
                hint = (f" The engine was most likely built by another TensorRT version than {info.name} "
                        f"{info.version}: rebuild it with this one.")
            raise RuntimeUnavailableError(f"{info.name} {info.version} cannot deserialise {self.path.name}: "
                                          f"{errors}.{hint}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise RuntimeUnavailableError(f"cannot create an execution context for {self.path.name}: "
                                          + (" | ".join(trt_logger.errors[-3:]) or "out of device memory?"))
        self.stream = torch.cuda.Stream()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        is_input = {n: self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self._inputs_meta = [self._meta(n) for n in names if is_input[n]]
        self._output_names = [n for n in names if not is_input[n]]

    def _meta(self, name: str) -> TensorMeta:
        dtype = tb.dtype_name(self.engine.get_tensor_dtype(name))
        return TensorMeta(name, dims(tuple(self.engine.get_tensor_shape(name))),
                          np.dtype(_NP_DTYPES.get(dtype, np.float32)).name)

    def deactivate_impl(self) -> None:
        self._outputs.clear()
        self.context = self.engine = self._runtime = None

    def input_metadata_impl(self) -> list[TensorMeta]:
        return list(self._inputs_meta)

    def output_names_impl(self) -> list[str]:
        return list(self._output_names)

    def device_memory_bytes(self) -> int:
        """Activation memory the engine asks TensorRT to allocate (excludes I/O buffers)."""
        for attr in ("device_memory_size_v2", "device_memory_size"):
            if hasattr(self.engine, attr):
                return int(getattr(self.engine, attr))
        return 0

    def infer_impl(self, feeds: Mapping[str, np.ndarray]) -> dict[str, Any]:
        import torch

        torch_dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8,
                        "int32": torch.int32, "int64": torch.int64, "bool": torch.bool, "uint8": torch.uint8}
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
        extra = {"trt": getattr(self, "trt_info", None) and self.trt_info.to_dict()}
        return {**super().info(), **extra}
