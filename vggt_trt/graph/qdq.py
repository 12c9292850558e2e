"""Activation fake-quantisation (QuantizeLinear -> DequantizeLinear on computed tensors) taken out of a graph.

The fp16/bf16 cast check compares a cast graph with its fp32 source. When both carry activation Q/DQ
(fp8, int8), the last-bit differences of the cast move values across quantisation steps, and the
check measures the quantiser's step size instead of the cast (an fp8 E4M3 step is 6-12 % of a
value). Comparing both graphs without their activation Q/DQ isolates the cast; the quantisation error
itself is measured against fp32 by the quant-mode check and the accuracy table.
"""

from __future__ import annotations

import logging
import time

import onnx

from .passes import log_pass

logger = logging.getLogger(__name__)


def _constant_names(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer}
    names.update(o for n in graph.node if n.op_type == "Constant" for o in n.output)
    return names


def has_activation_qdq(model: onnx.ModelProto) -> bool:
    """Whether any QuantizeLinear of the main graph quantises a computed tensor (not a weight)."""
    constants = _constant_names(model.graph)
    return any(n.op_type == "QuantizeLinear" and n.input[0] not in constants for n in model.graph.node)


def strip_activation_qdq(model: onnx.ModelProto) -> int:
    """Remove every QuantizeLinear of a computed tensor whose consumers are all DequantizeLinear, wiring the
    DequantizeLinear consumers to the unquantised tensor (in place); returns the pairs removed."""
    t0, graph = time.perf_counter(), model.graph
    before, constants = len(graph.node), _constant_names(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    rename: dict[str, str] = {}
    drop: set[int] = set()
    for q in graph.node:
        if q.op_type != "QuantizeLinear" or q.input[0] in constants or q.output[0] in graph_outputs:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(d.op_type != "DequantizeLinear" or d.output[0] in graph_outputs for d in dqs):
            continue
        drop.add(id(q))
        for dq in dqs:
            drop.add(id(dq))
            rename[dq.output[0]] = q.input[0]
    kept = [n for n in graph.node if id(n) not in drop]
    for node in kept:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    del graph.node[:]
    graph.node.extend(kept)
    stale = [v for v in graph.value_info if v.name in rename]
    for v in stale:
        graph.value_info.remove(v)
    pairs = len(drop) - len(rename)
    log_pass(logger, "strip_activation_qdq", before, len(kept), t0, f" ({pairs} activation quantisers removed)")
    return pairs
