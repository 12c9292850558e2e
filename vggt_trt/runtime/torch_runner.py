"""Our VGGT in PyTorch behind the runner interface (the accuracy reference)."""

from __future__ import annotations

import os
import time
from typing import Any, Mapping, Sequence

import numpy as np

from .base import Runner, TensorMeta, dims, torch_device


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
        # lazy: the model modules import torch, which a runner needs only once it is activated
        import torch

        from ..model.precision import apply_precision
        from ..model.vggt import PCD_OUTPUTS, check_image_shape
        from ..model.weights import build_model

        self.device = torch_device(self.requested_device)
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
        self.require_active()
        return self.model.cfg

    def input_metadata_impl(self) -> list[TensorMeta]:
        shape = self.input_shape or (None, 3, None, None)
        return [TensorMeta("images", dims(shape) if self.input_shape else (None, 3, None, None), "float32")]

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
