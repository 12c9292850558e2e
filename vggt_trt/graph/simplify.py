"""Graph simplification with onnxslim (memory-aware for multi-GB graphs) and the onnx checker."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from ..errors import GraphError, InputError
from ..resources import available_memory
from .io import (EXTERNAL_DATA_THRESHOLD, all_tensors, check_file, copy_onnx, graph_bytes, load_onnx, node_count,
                 save_onnx, save_sharing)
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


# Large graphs are simplified on their structure only (weights stay on disk): onnxslim's peak is then set by
# the .onnx file (graph structure and small inline constants), not by the weights. Measured on the full-size
# VGGT-1B pcd-only graph (docs/BENCHMARKS.md, issue 16): 0.47 GiB stage peak for an 8.6 MB .onnx beside a
# 4.6 GB data file (onnxslim read 975 small constants, 23 MB); loaded whole (main before issue 16) the same
# graph took 13.45 GiB, 2.9x its size. Needed: base + factor x the bytes held in memory, about 2x the peak.
SIMPLIFY_MEMORY_FACTOR = 3.2  # of the bytes held in memory: the .onnx file, or the whole graph when small
SIMPLIFY_MEMORY_BASE = 1 << 30  # interpreter, onnx, onnxslim, onnx-graphsurgeon and the constants they read


def simplify_memory_needed(src: Path, large: bool) -> int:
    """Bytes of memory onnxslim needs for ``src``: structure-only for a large graph, whole graph otherwise."""
    in_memory = src.stat().st_size if large else graph_bytes(src)
    return int(SIMPLIFY_MEMORY_BASE + SIMPLIFY_MEMORY_FACTOR * in_memory)


def simplify(model_path: str | os.PathLike, out_path: str | os.PathLike, *, skip: bool = False,
             large_model_bytes: int = EXTERNAL_DATA_THRESHOLD) -> SimplifyResult:
    """Simplify with onnxslim into ``out_path``; on failure warn and copy the unsimplified graph there.

    Graphs above ``large_model_bytes`` use onnxslim without shape inference and constant folding (with
    them onnxslim went past 20 GiB on the full-size VGGT graph, see shared/notes/full-size-export-on-cpu.md)
    on the graph structure only: the weights are not loaded, and ``out_path`` references the external
    data file of the input (the weights are unchanged). ``skip`` writes nothing and returns the input path.
    """
    src, out, t0 = check_file(model_path), Path(out_path), time.perf_counter()
    if src.resolve() == out.resolve():
        raise InputError(f"simplify: input and output are the same file: {src}")
    if skip:
        logger.info("simplify: skipped on request (--no-simplify); using %s", src.name)
        return SimplifyResult("skipped", str(src), "skipped on request")
    large = graph_bytes(src) > large_model_bytes
    needed, available = simplify_memory_needed(src, large), available_memory()
    if available is not None and available < needed:
        reason = (f"onnxslim needs about {needed / 2**30:.1f} GiB of memory for {src.name} and only "
                  f"{available / 2**30:.1f} GiB is available")
        logger.warning("simplify: skipped: %s; keeping the unsimplified graph (%s)", reason, out.name)
        keep_unsimplified(src, out, large)
        return SimplifyResult("skipped", str(out), reason, {}, None, None, time.perf_counter() - t0)
    options: dict[str, Any] = {"no_shape_infer": True, "skip_optimizations": ["constant_folding"]} if large else {}
    # MatMul+Add -> Reshape/Gemm(transB=1)/Reshape gains TensorRT nothing and hides the weights from
    # blockwise int4 quantisation (ModelOpt blocks a transposed Gemm weight along the wrong axis).
    options["skip_fusion_patterns"] = ["FusionGemm"]
    model = load_onnx(src, load_external_data=not large)
    before = node_count(model)
    structure = onnx.ModelProto()
    if large:
        structure.CopyFrom(model)  # onnxslim edits its input; the references to restore come from this copy
    slim, reason = run_onnxslim(model, options, src.parent if large else None)
    del model
    if slim is None:
        logger.warning("simplify: %s; keeping the unsimplified graph (%s)", reason, out.name)
        keep_unsimplified(src, out, large)
        return SimplifyResult("failed", str(out), reason, options, before, before, time.perf_counter() - t0)
    after = node_count(slim)
    if large:
        restored = restore_external(slim, structure, src.parent)
        logger.debug("simplify: %d tensors onnxslim loaded point at the external data again, %d stay inline",
                     restored, fix_inline_flags(slim))
        save_sharing(slim, src.parent, out)
    else:
        save_onnx(slim, out, restore=False)
    log_pass(logger, "simplify", before, after, t0, f" (onnxslim {options or 'defaults'})")
    return SimplifyResult("simplified", str(out), "", options, before, after, time.perf_counter() - t0)


@contextlib.contextmanager
def lazy_loads_from(base_dir: Path | None) -> Iterator[dict[str, int]]:
    """While active, onnxslim's lazily loaded constants read their external data from ``base_dir`` (onnxslim's
    vendored onnx-graphsurgeon reads it relative to the working directory). onnxslim reads the values of a few
    constants it inspects (Add/Mul/Expand operands in dead-node elimination); yields a count of them and their bytes."""
    loaded = {"tensors": 0, "bytes": 0}
    if base_dir is None:
        yield loaded
        return
    from onnxslim.third_party.onnx_graphsurgeon.ir.tensor import LazyValues

    original = LazyValues.load

    def load(self: Any) -> np.ndarray:
        tensor = self.tensor
        if tensor.HasField("raw_data") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor = inline_copy(tensor)  # a constant onnxslim loaded and re-exported in an earlier pass
        values = np.array(onnx.numpy_helper.to_array(tensor, base_dir=str(base_dir)))
        loaded["tensors"] += 1
        loaded["bytes"] += values.nbytes
        return values

    LazyValues.load = load
    try:
        yield loaded
    finally:
        LazyValues.load = original


def inline_copy(tensor: onnx.TensorProto) -> onnx.TensorProto:
    """``tensor`` with its data location set back to inline: the vendored onnx-graphsurgeon of onnxslim re-exports
    a loaded constant with ``raw_data`` but keeps the EXTERNAL flag of the tensor it came from."""
    out = onnx.TensorProto()
    out.CopyFrom(tensor)
    out.data_location = onnx.TensorProto.DEFAULT
    del out.external_data[:]
    return out


def fix_inline_flags(model: onnx.ModelProto) -> int:
    """Mark tensors that carry their bytes inline (``raw_data``, no location) as inline; returns how many."""
    fixed = 0
    for t in all_tensors(model):
        if t.data_location == onnx.TensorProto.EXTERNAL and not t.external_data:
            t.data_location = onnx.TensorProto.DEFAULT
            fixed += 1
    return fixed


def restore_external(model: onnx.ModelProto, source: onnx.ModelProto, base_dir: Path) -> int:
    """Turn tensors of ``model`` that onnxslim loaded and wrote inline back into references to the external data
    of ``source`` (same name, dtype, dims and bytes); returns how many. Bytes that differ stay inline."""
    refs = {t.name: t for t in all_tensors(source) if external_data_helper.uses_external_data(t)}
    restored = 0
    for t in all_tensors(model):
        ref = refs.get(t.name)
        if ref is None or not t.HasField("raw_data") or t.data_type != ref.data_type or list(t.dims) != list(ref.dims):
            continue
        info = external_data_helper.ExternalDataInfo(ref)
        with open(base_dir / info.location, "rb") as f:
            f.seek(info.offset or 0)
            same = f.read(len(t.raw_data) if info.length is None else info.length) == t.raw_data
        if same:
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            del t.external_data[:]
            t.external_data.extend(ref.external_data)
            restored += 1
    return restored


def run_onnxslim(model: onnx.ModelProto, options: dict[str, Any],
                 base_dir: Path | None = None) -> tuple[onnx.ModelProto | None, str]:
    """onnxslim on an in-memory model (``base_dir``: where its unloaded external data lives); (None, why) when
    it is missing or fails."""
    try:
        import onnxslim
    except ImportError as exc:
        return None, f"onnxslim is not installed ({exc}); pip install onnxslim"
    try:
        with lazy_loads_from(base_dir) as loaded:
            slim = onnxslim.slim(model, **options)
        if loaded["tensors"]:
            logger.info("simplify: onnxslim read %d constants (%.1f MB) from the external data", loaded["tensors"],
                        loaded["bytes"] / 1e6)
    # onnxslim is a third-party black box; any failure of it means "keep the unsimplified graph"
    except Exception as exc:  # noqa: BLE001
        return None, f"onnxslim failed: {type(exc).__name__}: {exc}"
    return (slim, "") if slim is not None else (None, "onnxslim returned no model")


def keep_unsimplified(src: Path, out: Path, large: bool) -> None:
    """``out`` as the unsimplified graph: structure only, sharing the data of ``src`` when large; a copy otherwise."""
    if large:
        save_sharing(load_onnx(src, load_external_data=False), src.parent, out)
    else:
        copy_onnx(src, out)


def check_model(path: str | os.PathLike, full_check: bool = False) -> None:
    """Run onnx.checker by path (works above 2 GB); raise GraphError with the checker's message."""
    p, t0 = check_file(path), time.perf_counter()
    try:
        onnx.checker.check_model(str(p), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(f"onnx.checker rejected {p}: {exc}") from exc
    logger.info("check_model: %s passed in %.2f s", p.name, time.perf_counter() - t0)

