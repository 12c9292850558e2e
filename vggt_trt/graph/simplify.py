"""Graph simplification with onnxslim (memory-aware for multi-GB graphs) and the onnx checker."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from ..errors import GraphError, InputError
from ..resources import available_memory
from .io import EXTERNAL_DATA_THRESHOLD, check_file, copy_onnx, graph_bytes, load_onnx, node_count, save_onnx
from .passes import log_pass

logger = logging.getLogger(__name__)


@dataclass
class SimplifyResult:
    """What ``simplify`` did: ``status`` is "simplified", "skipped" or "failed"; ``path`` is the graph to use next."""

    status: str
    path: str
    reason: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    nodes_before: int | None = None
    nodes_after: int | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Peak memory of onnxslim (no shape inference, no folding, no Gemm fusion) over graph bytes: 13.5 GiB for
# the 4.6 GiB VGGT-1B pcd-only graph, 13.7 GiB for the 4.8 GiB full graph (docs/BENCHMARKS.md); plus margin.
SIMPLIFY_MEMORY_FACTOR = 3.2


def simplify(model_path: str | os.PathLike, out_path: str | os.PathLike, *, skip: bool = False,
             large_model_bytes: int = EXTERNAL_DATA_THRESHOLD) -> SimplifyResult:
    """Simplify with onnxslim into ``out_path``; on failure warn and copy the unsimplified graph there.

    Graphs above ``large_model_bytes`` use onnxslim without shape inference and constant folding: with
    them onnxslim went past 20 GiB on the full-size VGGT graph (see shared/notes/full-size-export-on-cpu.md).
    ``skip`` writes nothing and returns the input path.
    """
    src, out, t0 = check_file(model_path), Path(out_path), time.perf_counter()
    if src.resolve() == out.resolve():
        raise InputError(f"simplify: input and output are the same file: {src}")
    if skip:
        logger.info("simplify: skipped on request (--no-simplify); using %s", src.name)
        return SimplifyResult("skipped", str(src), "skipped on request")
    size = graph_bytes(src)
    large = size > large_model_bytes
    available = available_memory()
    if large and available is not None and available < SIMPLIFY_MEMORY_FACTOR * size:
        reason = (f"onnxslim needs about {SIMPLIFY_MEMORY_FACTOR:g}x the graph size in memory "
                  f"({SIMPLIFY_MEMORY_FACTOR * size / 2**30:.1f} GiB for {size / 2**30:.1f} GiB) and only "
                  f"{available / 2**30:.1f} GiB is available")
        logger.warning("simplify: skipped: %s; keeping the unsimplified graph (copied to %s)", reason, out.name)
        copy_onnx(src, out)
        return SimplifyResult("skipped", str(out), reason, {}, None, None, time.perf_counter() - t0)
    options: dict[str, Any] = {"no_shape_infer": True, "skip_optimizations": ["constant_folding"]} if large else {}
    # MatMul+Add -> Reshape/Gemm(transB=1)/Reshape gains TensorRT nothing and hides the weights from
    # blockwise int4 quantisation (ModelOpt blocks a transposed Gemm weight along the wrong axis).
    options["skip_fusion_patterns"] = ["FusionGemm"]
    before = node_count(load_onnx(src, load_external_data=False))
    reason = ""
    try:
        import onnxslim
    except ImportError as exc:
        reason = f"onnxslim is not installed ({exc}); pip install onnxslim"
    else:
        try:
            slim = onnxslim.slim(str(src), **options)
            if slim is None:
                reason = "onnxslim returned no model"
        # onnxslim is a third-party black box; any failure of it means "keep the unsimplified graph"
        except Exception as exc:  # noqa: BLE001
            reason = f"onnxslim failed: {type(exc).__name__}: {exc}"
    if reason:
        logger.warning("simplify: %s; keeping the unsimplified graph (copied to %s)", reason, out.name)
        copy_onnx(src, out)
        return SimplifyResult("failed", str(out), reason, options, before, before, time.perf_counter() - t0)
    after = node_count(slim)
    save_onnx(slim, out, external_data=True if large else None, restore=False)
    log_pass(logger, "simplify", before, after, t0, f" (onnxslim {options or 'defaults'})")
    return SimplifyResult("simplified", str(out), "", options, before, after, time.perf_counter() - t0)


def check_model(path: str | os.PathLike, full_check: bool = False) -> None:
    """Run onnx.checker by path (works above 2 GB); raise GraphError with the checker's message."""
    p, t0 = check_file(path), time.perf_counter()
    try:
        onnx.checker.check_model(str(p), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(f"onnx.checker rejected {p}: {exc}") from exc
    logger.info("check_model: %s passed in %.2f s", p.name, time.perf_counter() - t0)

