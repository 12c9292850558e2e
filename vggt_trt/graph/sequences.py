"""ONNX graph passes that make a graph TensorRT can parse: sequence-op removal and opset / IR repair.

Each pass is a short function (model -> model) that logs node counts before and after.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import onnx

from ..errors import GraphError
from .io import EXTERNAL_DATA_THRESHOLD, node_count, subgraphs, tensor_bytes
from .passes import keep_model_header, log_pass, quiet_graphsurgeon

logger = logging.getLogger(__name__)

SEQUENCE_OPS = frozenset({"SplitToSequence", "SequenceAt", "ConcatFromSequence", "SequenceConstruct",
                          "SequenceLength", "SequenceEmpty", "SequenceInsert", "SequenceErase", "SequenceMap"})


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
    return [(n.name, n.op_type) for g in subgraphs(model.graph) for n in g.node if n.op_type in SEQUENCE_OPS]


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
        log_pass(logger, "remove_sequence_ops", before, before, t0, " (no sequence ops)")
        return model
    if any(g is not model.graph for g in subgraphs(model.graph) for n in g.node if n.op_type in SEQUENCE_OPS):
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
    keep_model_header(model, result)
    assert_no_sequence_ops(result)
    log_pass(logger, "remove_sequence_ops", before, node_count(result), t0, f" ({len(found)} sequence ops rewritten)")
    return result


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
    log_pass(logger, "repair_opset", n, n, t0)
    return model
