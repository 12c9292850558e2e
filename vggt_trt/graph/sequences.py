"""ONNX graph passes: sequence removal, opset repair, simplification, checking, precision cast, comparison.

Each pass is a short function (model -> model, or path -> result for the file-based ones) that logs node
counts before and after. The fp16/bf16 cast is written over onnx-graphsurgeon with its own dtype
propagation, so it needs no in-memory shape inference and works on external-data graphs above 2 GB.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from ..errors import GraphError, InputError
from .io import (EXTERNAL_DATA_THRESHOLD, _check_file, _graphs, copy_onnx, graph_bytes, load_onnx,
                      node_count, save_onnx, tensor_bytes)
# ONNX Runtime comparison helpers live with the file I/O and the fp16/bf16 cast in precision_cast;
# both are re-exported here as part of the graph-pass API
from .io import assert_accuracy, compare_onnx_ort, run_onnx  # noqa: F401

logger = logging.getLogger(__name__)

SEQUENCE_OPS = frozenset({"SplitToSequence", "SequenceAt", "ConcatFromSequence", "SequenceConstruct",
                          "SequenceLength", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceMap"})


@contextlib.contextmanager
def quiet_graphsurgeon() -> Iterator[Any]:
    """Import onnx-graphsurgeon with its own console logger limited to errors for the duration of a pass."""
    import onnx_graphsurgeon as gs
    from onnx_graphsurgeon.logger import G_LOGGER

    saved = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield gs
    finally:
        G_LOGGER.severity = saved


def _log_pass(name: str, before: int, after: int, t0: float, extra: str = "") -> None:
    logger.info("%s: %d -> %d nodes in %.2f s%s", name, before, after, time.perf_counter() - t0, extra)


def _const_value(tensor: Any) -> np.ndarray | None:
    """The value of a graph-surgeon tensor if it is an initializer or the output of a Constant node."""
    import onnx_graphsurgeon as gs

    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "Constant":
        return None
    for key, value in producer.attrs.items():
        if key == "value":
            return np.asarray(value.values)
        if key in ("value_int", "value_ints", "value_float", "value_floats"):
            return np.asarray(value)
    return None


# --------------------------------------------------------------------------------------- sequence removal
class _SequenceRewriter:
    """Resolves each sequence tensor to a list of plain tensors and rewrites the ops that consume it."""

    def __init__(self, graph: Any, gs: Any):
        self.graph, self.gs, self.opset = graph, gs, graph.opset
        self.cache: dict[str, list[Any]] = {}

    def _add(self, op: str, inputs: list, n_out: int = 1, attrs: dict | None = None, dtype: Any = None,
             name: str = "", outputs: list | None = None) -> list:
        outs = outputs or [self.gs.Variable(f"{name}_out{i}", dtype=dtype) for i in range(n_out)]
        self.graph.nodes.append(self.gs.Node(op, name=name, attrs=attrs or {}, inputs=inputs, outputs=outs))
        return outs

    def _ints(self, name: str, values: Sequence[int]) -> Any:
        return self.gs.Constant(name, np.asarray(values, dtype=np.int64))

    def _unsqueeze_or_squeeze(self, op: str, x: Any, axis: int, name: str) -> Any:
        if self.opset >= 13:
            return self._add(op, [x, self._ints(f"{name}_axes", [axis])], dtype=x.dtype, name=name)[0]
        return self._add(op, [x], attrs={"axes": [axis]}, dtype=x.dtype, name=name)[0]

    def _dim(self, node: Any, x: Any, axis: int) -> int:
        shape = x.shape
        if shape is None or not isinstance(shape[axis], int):
            raise GraphError(f"cannot rewrite {node.op} node {node.name!r}: the length of axis {axis} of "
                             f"{x.name!r} is not static (shape {shape}); export with static shapes")
        return int(shape[axis])

    def _split(self, node: Any) -> list:
        x, axis = node.inputs[0], int(node.attrs.get("axis", 0))
        split = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1].name else None
        squeeze = False
        if split is None:
            sizes, squeeze = [1] * self._dim(node, x, axis), not int(node.attrs.get("keepdims", 1))
        else:
            value = _const_value(split)
            if value is None:
                raise GraphError(f"cannot rewrite SplitToSequence node {node.name!r}: its split input "
                                 f"{split.name!r} is not a constant")
            if value.ndim == 0:
                n, step = self._dim(node, x, axis), int(value)
                sizes = [step] * (n // step) + ([n % step] if n % step else [])
            else:
                sizes = [int(v) for v in value.reshape(-1)]
        if self.opset >= 13:
            parts = self._add("Split", [x, self._ints(f"{node.name}_split", sizes)], len(sizes),
                              {"axis": axis}, x.dtype, f"{node.name}_Split")
        else:
            parts = self._add("Split", [x], len(sizes), {"axis": axis, "split": sizes}, x.dtype, f"{node.name}_Split")
        if squeeze:
            parts = [self._unsqueeze_or_squeeze("Squeeze", p, axis, f"{node.name}_Squeeze{i}")
                     for i, p in enumerate(parts)]
        return parts

    def _position(self, node: Any, index: int, length: int, default: int) -> int:
        if len(node.inputs) <= index or not node.inputs[index].name:
            return default
        value = _const_value(node.inputs[index])
        if value is None:
            raise GraphError(f"cannot rewrite {node.op} node {node.name!r}: position {node.inputs[index].name!r} "
                             "is not a constant")
        pos = int(value.reshape(-1)[0])
        return pos + length if pos < 0 else pos

    def elements(self, seq: Any) -> list:
        """The plain tensors making up sequence tensor ``seq``."""
        if seq.name in self.cache:
            return self.cache[seq.name]
        producer = seq.inputs[0] if seq.inputs else None
        if producer is None:
            raise GraphError(f"sequence {seq.name!r} is a graph input; only sequences built inside the graph "
                             "can be rewritten into tensor ops")
        op = producer.op
        if op == "SequenceConstruct":
            out = list(producer.inputs)
        elif op == "SplitToSequence":
            out = self._split(producer)
        elif op == "SequenceEmpty":
            out = []
        elif op in ("SequenceInsert", "SequenceErase"):
            out = list(self.elements(producer.inputs[0]))
            if op == "SequenceInsert":
                out.insert(self._position(producer, 2, len(out), len(out)), producer.inputs[1])
            elif not out:
                raise GraphError(f"SequenceErase node {producer.name!r} erases from an empty sequence")
            else:
                out.pop(self._position(producer, 1, len(out), len(out) - 1))
        else:
            raise GraphError(f"sequence {seq.name!r} comes from {op} node {producer.name!r}, which cannot be "
                             "rewritten into tensor ops")
        self.cache[seq.name] = out
        return out

    def rewrite(self, node: Any) -> None:
        """Replace a sequence-consuming node by tensor ops that produce the same output tensor."""
        items, out = self.elements(node.inputs[0]), node.outputs[0]
        node.outputs.clear()
        if node.op == "SequenceAt":
            pos = self._position(node, 1, len(items), 0)
            if not 0 <= pos < len(items):
                raise GraphError(f"SequenceAt node {node.name!r}: position {pos} outside a sequence of {len(items)}")
            self._add("Identity", [items[pos]], name=f"{node.name}_Identity", outputs=[out])
        elif node.op == "SequenceLength":
            value = self.gs.Constant(f"{node.name}_value", np.array(len(items), dtype=np.int64))
            self._add("Constant", [], attrs={"value": value}, name=f"{node.name}_Constant", outputs=[out])
        else:  # ConcatFromSequence
            if not items:
                raise GraphError(f"ConcatFromSequence node {node.name!r} concatenates an empty sequence")
            axis = int(node.attrs.get("axis", 0))
            if int(node.attrs.get("new_axis", 0)):
                items = [self._unsqueeze_or_squeeze("Unsqueeze", t, axis, f"{node.name}_Unsqueeze{i}")
                         for i, t in enumerate(items)]
            self._add("Concat", items, attrs={"axis": axis}, name=f"{node.name}_Concat", outputs=[out])


def _sequence_nodes(model: onnx.ModelProto) -> list[tuple[str, str]]:
    return [(n.name, n.op_type) for g in _graphs(model.graph) for n in g.node if n.op_type in SEQUENCE_OPS]


def assert_no_sequence_ops(model: onnx.ModelProto) -> None:
    """Raise GraphError naming every sequence op left in the graph (TensorRT cannot parse them)."""
    found = _sequence_nodes(model)
    if found:
        listed = ", ".join(f"{name or '<unnamed>'} ({op})" for name, op in found[:10])
        raise GraphError(f"{len(found)} sequence ops remain, which TensorRT cannot parse: {listed}"
                         + (" ..." if len(found) > 10 else ""))


def remove_sequence_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """Rewrite SplitToSequence/SequenceAt/ConcatFromSequence/SequenceConstruct (and friends) into tensor ops."""
    t0, before = time.perf_counter(), node_count(model)
    found = _sequence_nodes(model)
    if not found:
        _log_pass("remove_sequence_ops", before, before, t0, " (no sequence ops)")
        return model
    if any(g is not model.graph for g in _graphs(model.graph) for n in g.node if n.op_type in SEQUENCE_OPS):
        raise GraphError("sequence ops inside control-flow subgraphs cannot be rewritten: "
                         + ", ".join(f"{n} ({o})" for n, o in found[:10]))
    if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD:  # static axis lengths for SplitToSequence without split
        model = onnx.shape_inference.infer_shapes(model, strict_mode=False, data_prop=True)
    with quiet_graphsurgeon() as gs:
        graph = gs.import_onnx(model)
        rewriter = _SequenceRewriter(graph, gs)
        for node in list(graph.nodes):
            if node.op in ("SequenceAt", "SequenceLength", "ConcatFromSequence"):
                rewriter.rewrite(node)
        outputs = {t.name for t in graph.outputs}
        for node in graph.nodes:
            if node.op not in SEQUENCE_OPS:
                continue
            for out in node.outputs:
                users = [c for c in out.outputs if c.op not in SEQUENCE_OPS]
                if out.name in outputs or users:
                    where = ("is a graph output" if out.name in outputs
                             else f"feeds {users[0].op} node {users[0].name!r}")
                    raise GraphError(f"cannot rewrite {node.op} node {node.name!r}: its sequence {out.name!r} {where}")
            node.outputs.clear()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        result = gs.export_onnx(graph, do_type_check=False)
    _keep_model_header(model, result)
    assert_no_sequence_ops(result)
    _log_pass("remove_sequence_ops", before, node_count(result), t0, f" ({len(found)} sequence ops rewritten)")
    return result


def _keep_model_header(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    """Carry the IR version, opsets, producer and metadata of ``src`` over to a re-exported ``dst``."""
    dst.ir_version = src.ir_version
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)
    dst.producer_name, dst.producer_version = src.producer_name, src.producer_version
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)


# -------------------------------------------------------------------------------------------- opset repair
def repair_opset(model: onnx.ModelProto, opset: int = 18, max_ir_version: int = 10) -> onnx.ModelProto:
    """Ensure an ai.onnx opset_import exists (onnxsim's "IR version >= 3 must specify opset_import") and a sane IR.

    The IR version is kept within [what the opsets need, ``max_ir_version``]: 10 is what the dynamo exporter
    writes and what ONNX Runtime 1.31 and the TensorRT parsers read (onnx 1.23 defaults to IR 14, which
    ONNX Runtime 1.31 refuses).
    """
    t0, n = time.perf_counter(), node_count(model)
    seen: dict[str, onnx.OperatorSetIdProto] = {}
    for op in model.opset_import:
        domain = "" if op.domain == "ai.onnx" else op.domain
        if domain not in seen or op.version > seen[domain].version:
            seen[domain] = onnx.helper.make_opsetid(domain, op.version)
    if "" not in seen:
        logger.warning("graph has no ai.onnx opset_import; adding opset %d", opset)
        seen[""] = onnx.helper.make_opsetid("", opset)
    elif seen[""].version != opset:
        logger.info("graph declares ai.onnx opset %d (requested %d); keeping the graph's opset",
                    seen[""].version, opset)
    if len(seen) != len(model.opset_import) or "" not in {o.domain for o in model.opset_import}:
        del model.opset_import[:]
        model.opset_import.extend(seen.values())
    low = max(3, onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True))
    high = max(low, min(max_ir_version, onnx.IR_VERSION))
    if not low <= model.ir_version <= high:
        fixed = low if model.ir_version < low else high
        logger.warning("IR version %d is outside [%d, %d]; setting %d", model.ir_version, low, high, fixed)
        model.ir_version = fixed
    _log_pass("repair_opset", n, n, t0)
    return model


# ---------------------------------------------------------------------------------------------- simplify
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


def _available_memory() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, None where that file does not exist."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def simplify(model_path: str | os.PathLike, out_path: str | os.PathLike, *, skip: bool = False,
             large_model_bytes: int = EXTERNAL_DATA_THRESHOLD) -> SimplifyResult:
    """Simplify with onnxslim into ``out_path``; on failure warn and copy the unsimplified graph there.

    Graphs above ``large_model_bytes`` use onnxslim without shape inference and constant folding: with
    them onnxslim went past 20 GiB on the full-size VGGT graph (see shared/notes/full-size-export-on-cpu.md).
    ``skip`` writes nothing and returns the input path.
    """
    src, out, t0 = _check_file(model_path), Path(out_path), time.perf_counter()
    if src.resolve() == out.resolve():
        raise InputError(f"simplify: input and output are the same file: {src}")
    if skip:
        logger.info("simplify: skipped on request (--no-simplify); using %s", src.name)
        return SimplifyResult("skipped", str(src), "skipped on request")
    size = graph_bytes(src)
    large = size > large_model_bytes
    available = _available_memory()
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
    _log_pass("simplify", before, after, t0, f" (onnxslim {options or 'defaults'})")
    return SimplifyResult("simplified", str(out), "", options, before, after, time.perf_counter() - t0)


def check_model(path: str | os.PathLike, full_check: bool = False) -> None:
    """Run onnx.checker by path (works above 2 GB); raise GraphError with the checker's message."""
    p, t0 = _check_file(path), time.perf_counter()
    try:
        onnx.checker.check_model(str(p), full_check=full_check)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise GraphError(f"onnx.checker rejected {p}: {exc}") from exc
    logger.info("check_model: %s passed in %.2f s", p.name, time.perf_counter() - t0)


from .precision_cast import cast_precision  # noqa: E402,F401  (needs the helpers above)
