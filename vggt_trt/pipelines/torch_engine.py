"""The PyTorch engine as a conversion target: compile our VGGT once and keep its kernels in a
``<stem>_<precision>.torchcache`` artifact (``vggt_to_trt.py --backend torch``), for the GPUs where
TensorRT engines do not run (TensorRT-RTX on Hopper) or where TensorRT is not installed."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..graph.export import ExportSpec
from ..model.compiled import ARTIFACT_SUFFIX, COMPILE_MODES
from ..model.vggt import FULL_OUTPUTS, PCD_OUTPUTS
from ..precisions import TORCH_ENGINE_PRECISIONS
from ..runtime.torch_runner import TorchRunner

logger = logging.getLogger(__name__)



@dataclass
class TorchEngineOptions:
    output_dir: Path
    num_cams: int = 8
    height: int = 518
    width: int = 518
    pcd_only: bool = False
    model_name: str = "facebook/VGGT-1B"
    weights: Path | None = None
    random_init: bool = False
    seed: int = 0
    precision: str = "bf16"
    device: str = "auto"
    compile_mode: str = "default"

    def validate(self) -> ExportSpec:
        if self.precision not in TORCH_ENGINE_PRECISIONS:
            raise InputError(f"--backend torch builds {', '.join(TORCH_ENGINE_PRECISIONS)}, not {self.precision!r} "
                             "(int8/fp8/int4 go through ONNX Q/DQ and a TensorRT engine)")
        if self.compile_mode not in COMPILE_MODES:
            raise InputError(f"unknown compile mode {self.compile_mode!r}; choose from {', '.join(COMPILE_MODES)}")
        return ExportSpec(self.num_cams, self.height, self.width, self.pcd_only)


def build_torch_engine(opts: TorchEngineOptions) -> dict[str, Any]:
    """Compile our VGGT for one input shape and precision, run it once, write the compile-cache artifact."""
    spec = opts.validate()
    opts.output_dir.mkdir(parents=True, exist_ok=True)
    path = opts.output_dir / f"{spec.stem}_{opts.precision}{ARTIFACT_SUFFIX}"
    if path.exists():
        logger.info("%s exists: replacing it with a fresh compile", path)
        path.unlink()
    runner = TorchRunner(opts.model_name, opts.weights, opts.precision, opts.device,
                         outputs=PCD_OUTPUTS if opts.pcd_only else FULL_OUTPUTS, input_shape=spec.input_shape,
                         random_init=opts.random_init, seed=opts.seed, compile=True, compile_cache=path,
                         compile_mode=opts.compile_mode)
    images = np.random.default_rng(opts.seed).random(spec.input_shape, dtype=np.float32)
    t0 = time.perf_counter()
    with runner:
        runner.infer({"images": images})
        report = {"path": str(path), "stem": spec.stem, "precision": opts.precision, **runner.info(),
                  "total_s": round(time.perf_counter() - t0, 3)}
    logger.info("%s: compiled in %.1f s (first call), %.1f MB", path, report["first_call_s"],
                report["cache_bytes"] / 1e6)
    return report
