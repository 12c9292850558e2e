"""ONNX Runtime sessions behind the runner interface (CPU, or the CUDA / TensorRT execution providers)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import GraphError, InputError, MissingDependencyError
from ..graph.ort import ort_errors
from ..graph.views import VIEW_RANGE_KEY, parse_view_range
from .base import Runner, RuntimeUnavailableError, TensorMeta, dims

logger = logging.getLogger(__name__)


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
        self.views = None  # the view range the graph records (a dynamic view axis), read on activation

    def activate_impl(self) -> None:
        if not self.path.is_file():
            raise InputError(f"ONNX file not found: {self.path}")
        try:
            import onnxruntime as ort
        except ImportError as exc:
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
        except ort_errors() as exc:
            raise GraphError(f"ONNX Runtime cannot load {self.path}: {exc}") from exc
        used = self.session.get_providers()
        self.device = "cuda" if "CUDAExecutionProvider" in used or "TensorrtExecutionProvider" in used else "cpu"
        self.providers = used
        self.views = parse_view_range(self.session.get_modelmeta().custom_metadata_map.get(VIEW_RANGE_KEY))
        logger.info("ONNX Runtime %s providers: %s (optimisation level %s)", ort.__version__, used, self.opt_level)

    def deactivate_impl(self) -> None:
        self.session = None

    def input_metadata_impl(self) -> list[TensorMeta]:
        metas = [TensorMeta(i.name, dims(i.shape), _ort_dtype(i.type)) for i in self.session.get_inputs()]
        return [m.with_views(self.views) if len(m.shape) == 4 else m for m in metas]

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


def _ort_dtype(type_str: str) -> str:
    inner = type_str[len("tensor("):-1] if type_str.startswith("tensor(") else type_str
    return {"float": "float32", "float16": "float16", "double": "float64", "bfloat16": "float32"}.get(inner, inner)
