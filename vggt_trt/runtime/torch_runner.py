"""Our VGGT in PyTorch behind the runner interface: the accuracy reference, and the engine where TensorRT
does not run (Hopper GPUs), eager or compiled (:mod:`vggt_trt.model.compiled`)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .base import Runner, TensorMeta, dims, torch_device

logger = logging.getLogger(__name__)


class TorchRunner(Runner):
    """Our VGGT in PyTorch at any preset/weights and precision.

    ``compile``: regional ``torch.compile`` (kernels are built on the first call). ``compile_cache``: a
    ``.torchcache`` artifact to load before compiling when it exists (refused by name when it was made
    for another shape, precision, software or GPU), written after the first call when it does not.
    ``frames_chunk_size``: frames per dense-head pass (None: all at once). ``cuda_graph``: capture the
    whole forward in one CUDA graph per input shape after its first call and replay it (no per-kernel
    launch cost; CUDA only). Feeds may be host arrays or torch tensors already on the runner's device.
    """

    backend = "torch"

    def __init__(self, model_name: str = "facebook/VGGT-1B", weights: str | os.PathLike | None = None,
                 precision: str = "fp32", device: str = "auto", outputs: Sequence[str] | None = None,
                 input_shape: Sequence[int] | None = None, random_init: bool = False, seed: int = 0,
                 model: Any = None, compile: bool = False, compile_cache: str | os.PathLike | None = None,
                 compile_mode: str = "default", frames_chunk_size: int | None = 8, cuda_graph: bool = False) -> None:
        super().__init__(f"torch:{model_name}:{precision}{'+compile' if compile else ''}"
                         f"{'+cudagraph' if cuda_graph else ''}")
        if compile_cache is not None and not compile:
            raise InputError("a compile cache needs compile=True (--compile)")
        if frames_chunk_size is not None and frames_chunk_size < 1:
            raise InputError(f"frames_chunk_size must be >= 1 or None, found {frames_chunk_size}")
        self.model_name, self.weights, self.precision = model_name, weights, precision
        self.requested_device, self.outputs = device, tuple(outputs) if outputs else None
        self.input_shape = tuple(input_shape) if input_shape else None
        self.random_init, self.seed, self._given_model = random_init, seed, model
        self.compile, self.compile_mode, self.frames_chunk_size = compile, compile_mode, frames_chunk_size
        self.compile_cache = Path(compile_cache) if compile_cache is not None else None
        self.compile_report: dict[str, Any] = {}
        self.model: Any = None
        self._ctx: Any = None
        self._save_cache_after_first_call = False
        self.cuda_graph = cuda_graph
        self._graph: Any = None
        self._graph_in: Any = None
        self._graph_out: dict[str, Any] = {}

    @classmethod
    def from_compile_cache(cls, path: str | os.PathLike, **overrides: Any) -> "TorchRunner":
        """The runner a ``.torchcache`` artifact describes (model, weights, precision, shape, outputs)."""
        from ..model.compiled import read_compile_cache_header

        header = read_compile_cache_header(path)
        key, info = header["key"], header.get("info", {})
        kwargs = {"model_name": info.get("model_name", "facebook/VGGT-1B"), "weights": info.get("weights"),
                  "random_init": bool(info.get("random_init", False)), "seed": int(info.get("seed", 0)),
                  "precision": key["precision"], "input_shape": key["input_shape"], "outputs": key["outputs"],
                  "compile_mode": key["compile_mode"], "frames_chunk_size": key["frames_chunk_size"]}
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(compile=True, compile_cache=path, **kwargs)

    def activate_impl(self) -> None:
        # lazy: the model modules import torch, which a runner needs only once it is activated
        import torch

        from ..model.compiled import compile_regions, load_compile_cache
        from ..model.precision import apply_precision
        from ..model.vggt import PCD_OUTPUTS, check_image_shape
        from ..model.weights import build_model

        self.device = torch_device(self.requested_device)
        if self.cuda_graph and not self.device.startswith("cuda"):
            raise InputError(f"CUDA graphs (--cuda-graph) need a CUDA device; this runner is on {self.device}")
        t0 = time.perf_counter()
        if self._given_model is not None:
            model = self._given_model.to(self.device)
        else:
            model = build_model(self.model_name, self.weights, self.random_init, self.seed, device=self.device)
        self.model = model.eval()
        self.model.frames_chunk_size = self.frames_chunk_size
        self._ctx = apply_precision(self.model, self.precision)
        self.outputs = self.outputs or PCD_OUTPUTS
        if self.input_shape:
            check_image_shape(self.input_shape)
        self.compile_report = {"model_s": round(time.perf_counter() - t0, 3)}
        if self.compile:
            if self.compile_cache is not None and self.compile_cache.is_file():
                if not self.input_shape:
                    raise InputError(f"compile cache {self.compile_cache}: give the input shape it is for")
                t1 = time.perf_counter()
                load_compile_cache(self.compile_cache, self.expected_compile_key(self.input_shape))
                self.compile_report["cache_loaded_s"] = round(time.perf_counter() - t1, 3)
            elif self.compile_cache is not None:
                self._save_cache_after_first_call = True
            self.compile_report["regions"] = len(compile_regions(self.model, self.compile_mode))
        self.timing_method = "cuda-events" if self.device.startswith("cuda") else "perf_counter"
        torch.set_grad_enabled(False)

    def expected_compile_key(self, input_shape: Sequence[int]) -> dict[str, Any]:
        from ..model.compiled import compile_key

        return compile_key(self.model, self.precision, input_shape, self.outputs, self.compile_mode)

    def deactivate_impl(self) -> None:
        self.model, self._graph, self._graph_in, self._graph_out = None, None, None, {}
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    @property
    def config(self) -> Any:
        self.require_active()
        return self.model.cfg

    def info(self) -> dict[str, Any]:
        return {**super().info(), "precision": self.precision, "compile": self.compile, "cuda_graph": self.cuda_graph,
                "compile_cache": str(self.compile_cache) if self.compile_cache else None, **self.compile_report}

    def input_metadata_impl(self) -> list[TensorMeta]:
        shape = self.input_shape or (None, 3, None, None)
        return [TensorMeta("images", dims(shape) if self.input_shape else (None, 3, None, None), "float32")]

    def output_names_impl(self) -> list[str]:
        return list(self.outputs)

    def infer_impl(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        images = feeds["images"]
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
        images = images.to(self.device, dtype=torch.float32, non_blocking=True)
        cuda = self.device.startswith("cuda")
        if self._graph is not None and self._graph_in.shape == images.shape:
            return self._replay(images)
        first = self.compile and "first_call_s" not in self.compile_report
        t_first = time.perf_counter()
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
        if first:
            self.compile_report["first_call_s"] = round(time.perf_counter() - t_first, 3)
            from ..model.compiled import compile_cache_counters

            self.compile_report["cache_counters"] = compile_cache_counters()
            logger.info("compiled forward: first call %.1f s (kernels %s)", self.compile_report["first_call_s"],
                        "from the cache" if "cache_loaded_s" in self.compile_report else "built")
            if self._save_cache_after_first_call:
                self._write_compile_cache(tuple(images.shape))
        if self.cuda_graph:
            self._capture(images)
        return {k: v.float() for k, v in out.items()}

    def _capture(self, images: Any) -> None:
        """Record one forward at ``images``' shape into a CUDA graph (after a warm-up on a side stream)."""
        import torch

        t0 = time.perf_counter()
        self._graph, self._graph_in = None, images.clone()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.inference_mode(), self._ctx():
            self.model(self._graph_in, outputs=self.outputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.inference_mode(), self._ctx(), torch.cuda.graph(graph):
                self._graph_out = self.model(self._graph_in, outputs=self.outputs)
        except RuntimeError as e:
            raise InputError(f"the forward at shape {tuple(images.shape)} cannot be captured in a CUDA graph "
                             f"({e}); run without --cuda-graph") from e
        self._graph = graph
        self.compile_report["cuda_graph_capture_s"] = round(time.perf_counter() - t0, 3)
        logger.info("CUDA graph captured for input %s in %.1f s", tuple(images.shape),
                    self.compile_report["cuda_graph_capture_s"])

    def _replay(self, images: Any) -> dict[str, Any]:
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        self._graph_in.copy_(images)
        self._graph.replay()
        end.record()
        end.synchronize()
        self.last_inference_ms = start.elapsed_time(end)
        return {k: v.to(torch.float32, copy=True) for k, v in self._graph_out.items()}

    def _write_compile_cache(self, shape: tuple[int, ...]) -> None:
        from ..model.compiled import write_compile_cache

        info = {"model_name": self.model_name, "weights": str(self.weights) if self.weights else None,
                "random_init": self.random_init, "seed": self.seed,
                "first_call_s": self.compile_report["first_call_s"]}
        self.compile_report["cache_bytes"] = write_compile_cache(self.compile_cache, self.expected_compile_key(shape),
                                                                 info)
        self._save_cache_after_first_call = False
