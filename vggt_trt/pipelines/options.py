"""The VGGT model choice shared by the images and live pipelines, and the runner it makes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..model.compiled import ARTIFACT_SUFFIX
from ..runtime.ort_runner import OrtRunner
from ..runtime.torch_runner import TorchRunner
from ..runtime.trt_runner import TrtRunner, cuda_index

# what an images or live run writes into --out-dir and therefore owns there (vggt_trt/staging.py); the live
# outputs count for an images run too: they describe another reconstruction. per_camera_calib.json is an input
# of the next live run and is not owned
OWNED_OUTPUTS = frozenset({"points.ply", "cameras.json", "sparse", "depth.npz", "images", "summary.json",
                           "map.ply", "batches"})


@dataclass(kw_only=True)
class VggtModelOptions:
    """Which VGGT runs and how: an engine, an ONNX graph, or our PyTorch model."""

    backend: str = "torch"  # engine | onnx | torch
    model_path: Path | None = None  # .engine or .onnx
    model_name: str = "facebook/VGGT-1B"
    weights: Path | None = None
    precision: str = "fp32"
    device: str = "auto"
    random_init: bool = False
    trt_backend: str = "auto"
    seed: int = 0
    compile: bool = False  # regional torch.compile of the PyTorch model
    compile_cache: Path | None = None  # .torchcache to load (or write after the first call)
    frames_chunk_size: int | None = 8  # frames per dense-head pass of the PyTorch model
    cuda_graph: bool = False  # replay the PyTorch forward from one CUDA graph per input shape

    def make_runner(self) -> Any:
        if self.model_path is not None and Path(self.model_path).suffix == ARTIFACT_SUFFIX:
            return TorchRunner.from_compile_cache(self.model_path, device=self.device, weights=self.weights,
                                                  frames_chunk_size=self.frames_chunk_size,
                                                  cuda_graph=self.cuda_graph)
        if self.backend == "engine":
            return TrtRunner(self.model_path, trt_backend=self.trt_backend, device_index=cuda_index(self.device))
        if self.backend == "onnx":
            return OrtRunner(self.model_path)
        return TorchRunner(model_name=self.model_name, weights=self.weights, precision=self.precision,
                           device=self.device, random_init=self.random_init, seed=self.seed,
                           compile=self.compile, compile_cache=self.compile_cache,
                           frames_chunk_size=self.frames_chunk_size, cuda_graph=self.cuda_graph)
