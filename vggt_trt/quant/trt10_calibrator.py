"""TensorRT 10's classic INT8 path: an ``IInt8EntropyCalibrator2`` fed from a :class:`CalibrationSet`.

Only TensorRT 10.x has it (``config.int8_calibrator`` with ``BuilderFlag.INT8`` on a weakly typed
network); TensorRT 11 removed the calibrators and TensorRT-RTX never had them, so those builds take
the explicit Q/DQ path (``--precision int8`` without ``--int8-calibrator``).

The TensorRT module is passed in (``trt_backend`` is the only module that imports it); the
calibrator class is built at call time as a subclass of ``trt.IInt8EntropyCalibrator2``. Batches
are copied to the GPU through a PyTorch CUDA tensor kept alive by the calibrator.

Calibration cache: ``calibration-<key16>.cache`` in the output directory. The key hashes the
calibration data identity (:meth:`CalibrationSet.key`: fingerprint, shape, sampling, preprocessing),
the network input name and shape, the graph fingerprint and the TensorRT version, so changed data,
another graph or another TensorRT never reuse a stale cache. Writes are atomic.

The four methods are C callbacks: an exception must not cross into TensorRT. ``get_batch`` logs
a failure, records it and returns None (TensorRT then ends calibration); the caller turns the
recorded failure into an error with :meth:`raise_if_failed` after the build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import write_bytes_atomic
from .calib import CalibrationSet
from ..errors import BuildError, InputError, MissingDependencyError

logger = logging.getLogger(__name__)

CALIBRATOR_NAME = "IInt8EntropyCalibrator2"
QDQ_ALTERNATIVE = ("use the explicit Q/DQ path instead: --precision int8 without --int8-calibrator "
                   "(ModelOpt inserts calibrated Q/DQ nodes into the ONNX graph)")
_CACHE_VERSION = "trt-int8-entropy2-cache-v1"


def calibration_cache_key(calib_set: CalibrationSet, input_shape: Sequence[int], trt_version: str,
                          input_name: str = "images", graph_fingerprint: str = "") -> str:
    """SHA-256 over everything a TensorRT calibration cache depends on (hex digest)."""
    payload = {"format": _CACHE_VERSION, "calibrator": CALIBRATOR_NAME, "data": calib_set.key(),
               "input_name": input_name, "input_shape": [int(d) for d in input_shape],
               "tensorrt": str(trt_version), "graph": graph_fingerprint}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def calibration_cache_path(cache_dir: str | os.PathLike, key: str) -> Path:
    return Path(cache_dir) / f"calibration-{key[:16]}.cache"


def read_calibration_cache(path: Path) -> bytes | None:
    """The cache bytes when the file exists and is non-empty; None otherwise (calibrate from data)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    if not data:
        logger.warning("calibration cache %s is empty; calibrating from data", path)
        return None
    return data


def check_batch(batch: Any, expected_shape: Sequence[int], input_name: str) -> np.ndarray:
    """The batch as a contiguous float32 array; InputError (expected vs found) on a wrong shape or dtype."""
    if not isinstance(batch, np.ndarray):
        raise InputError(f"calibration batch for {input_name!r}: expected a numpy array, found {type(batch).__name__}")
    expected = tuple(int(d) for d in expected_shape)
    if tuple(batch.shape) != expected:
        raise InputError(f"calibration batch for {input_name!r}: expected shape {list(expected)}, "
                         f"found {list(batch.shape)}")
    if batch.dtype != np.float32:
        raise InputError(f"calibration batch for {input_name!r}: expected dtype float32, found {batch.dtype}")
    return np.ascontiguousarray(batch)


def _calibrator_base(trt: Any) -> type:
    base = getattr(trt, CALIBRATOR_NAME, None)
    if base is None:
        name = getattr(trt, "__name__", "this TensorRT module")
        version = getattr(trt, "__version__", "unknown version")
        raise InputError(f"{name} {version} has no {CALIBRATOR_NAME}: TensorRT 11 removed the INT8 calibrators "
                         f"and TensorRT-RTX has none (TensorRT 10: pip install \"tensorrt-cu12<11\"); "
                         f"{QDQ_ALTERNATIVE}")
    return base


def _cuda_torch(device: str) -> tuple[Any, Any]:
    """(torch, torch.device) for the calibration buffers; clear errors when PyTorch cannot reach a GPU."""
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(f"the {CALIBRATOR_NAME} path needs PyTorch with CUDA to hold calibration "
                                     f"batches on the GPU: {exc}") from exc
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise InputError(f"calibration device {device!r} is not a torch device: {exc}") from exc
    if dev.type != "cuda":
        raise InputError(f"calibration device must be a CUDA device (TensorRT reads device pointers), found {device!r}")
    if not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else " is a CPU-only build")
        raise MissingDependencyError(f"the {CALIBRATOR_NAME} path needs PyTorch with a usable CUDA GPU to feed "
                                     f"calibration batches ({build}; torch.cuda.is_available() is False); "
                                     f"install a CUDA build of torch on the GPU machine, or {QDQ_ALTERNATIVE}")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"calibration device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return torch, dev


def make_entropy_calibrator(trt: Any, calib_set: CalibrationSet, cache_dir: str | os.PathLike,
                            input_name: str = "images", device: str = "cuda", *,
                            input_shape: Sequence[int] | None = None, graph_fingerprint: str = "") -> Any:
    """A ``trt.IInt8EntropyCalibrator2`` feeding ``calib_set`` to the network input ``input_name``.

    ``cache_dir`` is where ``calibration-<key16>.cache`` lives (the output directory).
    ``input_shape`` is the network input's static shape (default: the calibration batch shape); the
    calibration set must match it. ``graph_fingerprint`` (e.g. the ONNX SHA-256) keeps a cache from
    being reused for another graph. Raises InputError when the module has no calibrator (TensorRT 11,
    TensorRT-RTX) or shapes disagree, MissingDependencyError when PyTorch has no CUDA.
    """
    base = _calibrator_base(trt)
    expected = tuple(int(d) for d in (input_shape if input_shape is not None else calib_set.batch_shape))
    if tuple(calib_set.batch_shape) != expected:
        raise InputError(f"calibration batches for {input_name!r}: expected shape {list(expected)} (the network "
                         f"input), found {list(calib_set.batch_shape)} ({calib_set.description})")
    torch, dev = _cuda_torch(device)
    version = str(getattr(trt, "__version__", "unknown"))
    key = calibration_cache_key(calib_set, expected, version, input_name, graph_fingerprint)
    cache_file = calibration_cache_path(cache_dir, key)

    class EntropyCalibrator(base):  # type: ignore[misc, valid-type]
        """IInt8EntropyCalibrator2 over a CalibrationSet, with a keyed calibration cache."""

        def __init__(self) -> None:
            base.__init__(self)  # TensorRT's pybind trampoline must be initialised explicitly
            self.cache_file = cache_file
            self.cache_key = key
            self.batches_fed = 0
            self.cache_hit = False
            self.cache_written = False
            self.cache_write_error = ""
            self.failure: BaseException | None = None
            self._batches: Any = None  # iterator, created on the first get_batch (a cache hit loads no data)
            self._buffer: Any = None  # the device tensor TensorRT reads; kept alive between calls

        def get_batch_size(self) -> int:
            return 1  # explicit-batch network: the batch dimension is part of the input shape

        def get_batch(self, names: Sequence[str], *_: Any) -> list[int] | None:
            try:
                return self._next_batch(names)
            except Exception as exc:  # noqa: BLE001 - C callback: must not raise into TensorRT; re-raised by raise_if_failed
                logger.error("INT8 calibration failed at batch %d of %d: %s: %s", self.batches_fed + 1,
                             len(calib_set), type(exc).__name__, exc)
                self.failure = exc
                self._buffer = None
                return None

        def _next_batch(self, names: Sequence[str]) -> list[int] | None:
            if list(names) != [input_name]:
                raise InputError(f"the calibrator feeds one input {input_name!r}; the network asks for {list(names)}")
            if self._batches is None:
                logger.info("INT8 calibration (%s): %d batches of %s from %s on %s", CALIBRATOR_NAME,
                            len(calib_set), list(expected), calib_set.description, dev)
                self._batches = iter(calib_set)
            batch = next(self._batches, None)
            if batch is None:
                logger.info("INT8 calibration: all %d batches fed", self.batches_fed)
                self._buffer = None
                return None
            host = torch.from_numpy(check_batch(batch, expected, input_name))
            if self._buffer is None:
                self._buffer = torch.empty(expected, dtype=torch.float32, device=dev)
            self._buffer.copy_(host)
            torch.cuda.synchronize(dev)  # TensorRT reads the buffer on its own stream
            self.batches_fed += 1
            logger.info("INT8 calibration: batch %d/%d fed", self.batches_fed, len(calib_set))
            return [int(self._buffer.data_ptr())]

        def read_calibration_cache(self, *_: Any) -> bytes | None:
            try:
                data = read_calibration_cache(self.cache_file)
            except OSError as exc:  # C callback: an unreadable cache means calibrating from data
                logger.warning("cannot read calibration cache %s (%s); calibrating from data", self.cache_file, exc)
                return None
            if data is not None:
                self.cache_hit = True
                logger.info("INT8 calibration cache hit: %s (%d bytes, key %s); no batches needed",
                            self.cache_file, len(data), key[:16])
            else:
                logger.info("no INT8 calibration cache at %s; calibrating from data", self.cache_file)
            return data

        def write_calibration_cache(self, cache: Any) -> None:
            if self.failure is not None:  # scales from partial data must never be reused as a cache hit
                logger.error("calibration cache %s not written: calibration failed after %d batches",
                             self.cache_file, self.batches_fed)
                return
            try:
                data = bytes(memoryview(cache))
                write_bytes_atomic(self.cache_file, data)
            except (OSError, TypeError, ValueError) as exc:  # C callback: a lost cache only costs a recalibration
                self.cache_write_error = f"{type(exc).__name__}: {exc}"
                logger.error("cannot write calibration cache %s: %s", self.cache_file, self.cache_write_error)
                return
            self.cache_written = True
            logger.info("INT8 calibration cache written: %s (%d bytes)", self.cache_file, len(data))

        def raise_if_failed(self) -> None:
            """Turn a failure recorded inside get_batch into a BuildError (call after the build)."""
            if self.failure is not None:
                raise BuildError(f"INT8 calibration failed after {self.batches_fed} of {len(calib_set)} batches: "
                                 f"{type(self.failure).__name__}: {self.failure}") from self.failure

        def release(self) -> None:
            """Free the device buffer (the calibrator object may outlive the build)."""
            self._buffer = None
            self._batches = None

        def report(self) -> dict[str, Any]:
            return {"path": CALIBRATOR_NAME, "cache": str(self.cache_file), "cache_key": key,
                    "cache_hit": self.cache_hit, "cache_written": self.cache_written,
                    "cache_write_error": self.cache_write_error, "batches_fed": self.batches_fed,
                    "batches_planned": len(calib_set), "data": calib_set.description,
                    "input": {"name": input_name, "shape": list(expected)}, "device": str(dev),
                    "tensorrt": version}

    return EntropyCalibrator()
