"""One call from a path or model name to the right runner; the only module that knows every concrete runner."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..model.compiled import ARTIFACT_SUFFIX
from .base import Runner
from .ort_runner import OrtRunner
from .torch_runner import TorchRunner
from .trt_runner import TrtRunner

BACKENDS = ("auto", "engine", "onnx", "torch")


def make_runner(path_or_spec: str | os.PathLike | None, backend: str = "auto", **kwargs: Any) -> Runner:
    """A runner for an ``.engine``/``.plan`` (TensorRT), ``.onnx`` (ONNX Runtime), a ``.torchcache``
    compiled PyTorch engine, or a torch model name.

    ``backend="auto"`` picks by file suffix; a non-file argument (or ``backend="torch"``) is a model
    preset/hub id for :class:`TorchRunner`. ``kwargs`` go to the runner's constructor.
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    text = os.fspath(path_or_spec) if path_or_spec is not None else ""
    suffix = Path(text).suffix.lower()
    if backend == "auto":
        backend = {".engine": "engine", ".plan": "engine", ".trt": "engine", ".onnx": "onnx"}.get(suffix, "torch")
        if suffix == ARTIFACT_SUFFIX:
            return TorchRunner.from_compile_cache(text, **kwargs)
        if backend == "torch" and Path(text).is_file():
            raise InputError(f"cannot tell the backend of {text}: expected .engine/.plan, .onnx or {ARTIFACT_SUFFIX}")
    if backend == "engine":
        return TrtRunner(text, **kwargs)
    if backend == "onnx":
        return OrtRunner(text, **kwargs)
    return TorchRunner(model_name=text or "facebook/VGGT-1B", **kwargs)
