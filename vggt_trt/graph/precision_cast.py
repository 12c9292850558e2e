"""Strongly typed fp16/bf16 graphs over onnx-graphsurgeon, with fp32 kept where precision matters.

Own dtype propagation, so no in-memory shape inference is needed and external-data graphs above
2 GB work.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import external_data_helper

from ..errors import GraphError, InputError
from .io import load_onnx, node_count, write_streamed
from .passes import keep_model_header, quiet_graphsurgeon

logger = logging.getLogger(__name__)

_F32, _BOOL, _I64 = onnx.TensorProto.FLOAT, onnx.TensorProto.BOOL, onnx.TensorProto.INT64
_LOW = {"fp16": onnx.TensorProto.FLOAT16, "bf16": onnx.TensorProto.BFLOAT16}
_FP32_OPS = {  # ops kept in fp32, by reason (NVIDIA AutoCast-style rules)
    "norm": {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
             "RMSNormalization", "LpNormalization", "MeanVarianceNormalization", "ReduceMean", "ReduceSumSquare",
             "ReduceL2", "ReduceLogSumExp", "Pow", "Sqrt", "Reciprocal"},
    "softmax": {"Softmax", "LogSoftmax"},
    "exp-head": {"Exp", "Log", "Softplus"},  # torch.expm1 exports as Exp then Sub
    "range": {"Range"},  # TensorRT's Range takes only int32, int64 and float
    "trig": {"Sin", "Cos", "Tan", "Asin", "Acos", "Atan", "Sinh", "Cosh"},
    "random": {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli", "EyeLike"},
    "quantization": {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"},
}
_OP_REASON = {op: reason for reason, ops in _FP32_OPS.items() for op in ops}
# TensorRT-RTX 1.7 cannot build a bf16 deconvolution (Myelin: "Could not infer output types ... deconv")
_NO_LOW_KERNEL = {"fp16": set(), "bf16": {"ConvTranspose"}}
# ops an exp-type head activation flows through in fp32 (e.g. conf = 1 + exp(x)) until the next MatMul/Conv
_ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Clip", "Relu", "Sigmoid", "Tanh", "Max", "Min", "Sum",
                "Mean", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Concat", "Split", "Gather",
                "Identity", "Expand", "Flatten", "Where", "Tile", "Pad", "Floor", "Ceil", "Round", "Sign"}
_ANY_TYPE_INPUTS = {"Shape", "Size", "Cast"}
_FP32_INPUTS = {"Resize": {1, 2}, "Upsample": {1}, "Dropout": {1}}  # typed tensor(float) whatever the data type


def _enum(dtype: Any) -> int | None:
    if dtype is None or isinstance(dtype, int):
        return dtype
    return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


def _output_dtypes(node: Any, ins: list[int | None]) -> list[int | None]:
    """ONNX output element types of ``node`` from its input types (types only: no shapes, no data)."""
    op, a, n = node.op, node.attrs, len(node.outputs)
    first = ins[0] if ins and ins[0] is not None else next((t for t in ins if t is not None), None)
    if op in {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}:
        return [_BOOL] * n
    if op in {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}:
        return [_I64] * n
    if op == "Cast":
        return [int(a["to"])]
    if op in ("CastLike", "Where"):
        return [ins[1]]
    if op in ("Constant", "ConstantOfShape"):
        if a.get("value") is not None:
            return [_enum(a["value"].dtype)]
        return [_F32 if op == "ConstantOfShape" or {"value_float", "value_floats"} & set(a) else _I64]
    if op in _FP32_OPS["random"]:
        return [int(a["dtype"]) if "dtype" in a else (first if op.endswith("Like") else _F32)]
    if op in ("TopK", "MaxPool"):
        return [first, _I64]
    if op == "LayerNormalization":
        return [first] + [int(a.get("stash_type", _F32))] * (n - 1)
    if op == "DequantizeLinear":
        return [ins[1]]
    if op == "QuantizeLinear":
        return [ins[2] if len(ins) > 2 and ins[2] is not None else onnx.TensorProto.UINT8]
    if op == "OneHot":
        return [ins[2]]
    return [first] * n


def _read(const: Any) -> np.ndarray:
    """A Constant's values without caching them in the graph (GS keeps loaded arrays: 2x memory on big weights)."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    lazy = getattr(const, "_values", None)
    return lazy.load() if isinstance(lazy, LazyValues) else np.asarray(const.values)


def _external_source(const: Any) -> onnx.TensorProto | None:
    """The TensorProto behind a constant whose bytes are external and not loaded, else None."""
    from onnx_graphsurgeon.ir.tensor import LazyValues

    lazy = getattr(const, "_values", None)
    if not isinstance(lazy, LazyValues) or lazy.tensor.HasField("raw_data"):
        return None
    return lazy.tensor if external_data_helper.uses_external_data(lazy.tensor) else None


def _to_low(values: np.ndarray, low: int, stats: dict[str, Any]) -> np.ndarray:
    stats["constants_converted"] += 1
    if low == onnx.TensorProto.BFLOAT16:
        import ml_dtypes

        return np.asarray(values.astype(ml_dtypes.bfloat16))
    with np.errstate(over="ignore"):
        out = np.asarray(values.astype(np.float16))  # no full-size float32 temporaries (multi-GB weights)
    overflow = np.isinf(out) & np.isfinite(values)
    clipped = int(np.count_nonzero(overflow))
    if clipped:
        out[overflow] = np.where(values[overflow] > 0, np.finfo(np.float16).max, np.finfo(np.float16).min)
        stats["values_clipped"] += clipped
    return out


class _Caster:
    """One fp16/bf16 cast: classify nodes, retype the low ones, then convert every edge whose types disagree."""

    def __init__(self, graph: Any, gs: Any, precision: str, keep_nodes: Sequence[str],
                 deferred: set[str] | None = None):
        self.graph, self.gs, self.precision, self.keep = graph, gs, precision, set(keep_nodes)
        self.low = _LOW[precision]
        self.deferred = deferred  # None: convert in memory; a set: names of external constants converted on write
        self.stats: dict[str, Any] = {"constants_converted": 0, "values_clipped": 0, "casts_inserted": 0,
                                      "casts_rewritten": 0}
        self.mode: dict[int, str] = {}  # id(node) -> "low" or the reason it stays fp32
        tensors = graph.tensors()
        self.types = {name: _enum(t.dtype) for name, t in tensors.items()}
        self.const = {name for name, t in tensors.items() if isinstance(t, gs.Constant)}
        for node in graph.nodes:  # dtype propagation and data-independent ("constant-like") tensors
            for out, dt in zip(node.outputs, _output_dtypes(node, [self.types.get(t.name) for t in node.inputs])):
                self.types[out.name] = self.types.get(out.name) or dt
            if node.op in ("Shape", "Size") or (node.op not in _FP32_OPS["random"]
                                                and all(not t.name or t.name in self.const for t in node.inputs)):
                self.const.update(o.name for o in node.outputs)
        self.orig = dict(self.types)

    def f32(self, t: Any) -> bool:
        return bool(t.name) and self.orig.get(t.name) == _F32

    def classify(self) -> None:
        for node in self.graph.nodes:
            if not any(self.f32(t) for t in (*node.inputs, *node.outputs)):
                continue
            srcs = [t.inputs[0] for t in node.inputs if self.f32(t) and t.name not in self.const and t.inputs]
            if node.name in self.keep:
                m = "user"
            elif node.op in _OP_REASON:
                m = _OP_REASON[node.op]
            elif node.op in _NO_LOW_KERNEL[self.precision]:
                m = f"no-{self.precision}-kernel"
            elif node.op == "Constant" or (node.op == "Cast" and int(node.attrs.get("to", 0)) == _F32):
                m = "follow"
            elif all(o.name in self.const for o in node.outputs):
                m = "constant-subgraph"
            elif node.op in _ELEMENTWISE and srcs and all(self.mode.get(id(s)) == "exp-head" for s in srcs):
                m = "exp-head"
            else:
                m = "low"
            self.mode[id(node)] = m
        outputs = {t.name for t in self.graph.outputs}
        for node in reversed(self.graph.nodes):  # Cast(to=FLOAT) and Constant follow their consumers
            if self.mode.get(id(node)) == "follow":
                ok = all(o.name not in outputs and all(self.wants(c, o) != "fp32" for c in o.outputs)
                         for o in node.outputs)
                self.mode[id(node)] = "low" if ok else "feeds-fp32"

    def wants(self, node: Any, t: Any) -> str:
        """The type ``node`` needs on input ``t``: "low", "fp32" or "any"."""
        m = self.mode.get(id(node))
        if node.op in _ANY_TYPE_INPUTS or m is None:
            return "any"
        if any(node.inputs[i] is t for i in _FP32_INPUTS.get(node.op, ()) if i < len(node.inputs)):
            return "fp32"
        return "low" if m == "low" else "fp32"

    def retype_low_nodes(self) -> None:
        gs, low = self.gs, self.low
        for node in self.graph.nodes:
            if self.mode.get(id(node)) != "low":
                continue
            if node.op == "Cast" and int(node.attrs["to"]) == _F32:
                node.attrs["to"] = low
                self.stats["casts_rewritten"] += 1
            value = node.attrs.get("value") if node.op in ("Constant", "ConstantOfShape") else None
            if value is not None and _enum(value.dtype) == _F32:
                node.attrs["value"] = self.low_constant(value, value.name)
            for key in ("value_float", "value_floats"):
                if node.op == "Constant" and key in node.attrs:
                    vals = np.asarray(node.attrs.pop(key), dtype=np.float32)
                    node.attrs["value"] = gs.Constant(f"{node.name}_value", _to_low(vals, low, self.stats))
            for out in node.outputs:
                if self.orig.get(out.name) == _F32:
                    out.dtype, self.types[out.name] = low, low

    def keep_outputs_fp32(self) -> None:
        """Graph outputs stay fp32: the producer writes a low-precision copy and a Cast restores fp32."""
        for out in self.graph.outputs:
            if self.orig.get(out.name) != _F32 or self.types.get(out.name) != self.low or not out.inputs:
                continue
            low_t = self.gs.Variable(f"{out.name}_{self.precision}", dtype=self.low, shape=out.shape)
            producer = out.inputs[0]
            producer.outputs[producer.outputs.index(out)] = low_t
            for consumer in list(out.outputs):
                for i, t in enumerate(consumer.inputs):
                    if t is out and self.wants(consumer, t) == "low":
                        consumer.inputs[i] = low_t
            self.graph.nodes.append(self.gs.Node("Cast", name=f"{out.name}_to_fp32", attrs={"to": _F32},
                                                 inputs=[low_t], outputs=[out]))
            out.dtype, self.types[low_t.name], self.types[out.name] = np.float32, self.low, _F32
            self.stats["casts_inserted"] += 1

    def convert_edges(self) -> None:
        """Give every fp32-typed input the type its consumer wants: converted weights or one shared Cast."""
        gs, converted = self.gs, {}
        for node in list(self.graph.nodes):
            for i, t in enumerate(node.inputs):
                target = {"low": self.low, "fp32": _F32}.get(self.wants(node, t) if self.f32(t) else "any")
                if target is None or self.types.get(t.name) == target:
                    continue
                key = (t.name, target)
                if key not in converted:
                    if isinstance(t, gs.Constant):
                        converted[key] = self.low_constant(t, f"{t.name}_{self.precision}")
                    else:
                        name = f"{t.name}_to_{'fp32' if target == _F32 else self.precision}"
                        converted[key] = gs.Variable(name, dtype=target, shape=t.shape)
                        self.graph.nodes.append(gs.Node("Cast", name=f"{name}_Cast", attrs={"to": target},
                                                        inputs=[t], outputs=[converted[key]]))
                        self.stats["casts_inserted"] += 1
                    self.types[converted[key].name] = target
                node.inputs[i] = converted[key]

    def low_constant(self, const: Any, name: str) -> Any:
        """A low-precision copy of fp32 constant ``const`` named ``name``: converted now, or, for a tensor whose
        bytes are still on disk when conversions are deferred, a placeholder the streamed write converts."""
        source = _external_source(const)
        if source is None or self.deferred is None:
            return self.gs.Constant(name, _to_low(_read(const), self.low, self.stats))
        from onnx_graphsurgeon.ir.tensor import LazyValues

        placeholder = onnx.TensorProto(name=name, data_type=self.low, dims=source.dims,
                                       data_location=onnx.TensorProto.EXTERNAL)
        placeholder.external_data.extend(source.external_data)  # the fp32 bytes: converted when written
        self.deferred.add(name)
        self.stats["constants_converted"] += 1
        return self.gs.Constant(name, LazyValues(placeholder))

    def summary(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for m in self.mode.values():
            if m != "low":
                reasons[m] = reasons.get(m, 0) + 1
        kept = sum(reasons.values())
        return {"precision": self.precision, "float_nodes": len(self.mode), "low_nodes": len(self.mode) - kept,
                "fp32_nodes": kept, "fp32_by_reason": dict(sorted(reasons.items())), **self.stats}


def cast_precision(model: onnx.ModelProto, precision: str = "fp16", *,
                   keep_nodes: Sequence[str] = ()) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Strongly typed fp16/bf16 graph: low-precision compute, fp32 where precision matters, fp32 graph I/O.

    Kept in fp32 (the summary counts them by reason): norms and norm statistics, softmax, exp/log head
    activations and the element-wise ops after them, Range, trig, data-independent subgraphs (position
    embeddings, RoPE tables) and nodes named in ``keep_nodes``. Exporter Cast(to=FLOAT) nodes follow their
    consumers, so no op ever sees mixed input types (TensorRT: "ElementWiseOperation PROD must have same
    input types"). Needs no shape inference. :func:`cast_precision_file` does the same from a path, one
    weight at a time.
    """
    t0 = time.perf_counter()
    result, summary = _cast(model, precision, keep_nodes, None)
    _log_summary(summary, time.perf_counter() - t0)
    return result, summary


def cast_precision_file(src: str | os.PathLike, dst: str | os.PathLike, precision: str = "fp16", *,
                        keep_nodes: Sequence[str] = ()) -> dict[str, Any]:
    """:func:`cast_precision` of the graph at ``src`` written atomically to ``dst``, streaming the weights:
    the graph is loaded without its external data, and each weight is read, converted and written to
    ``<dst>.data`` one at a time (memory: the graph structure plus one tensor). The tensors are byte for
    byte those of the in-memory cast. Returns the cast summary."""
    src_p, t0 = Path(src), time.perf_counter()
    model = load_onnx(src_p, load_external_data=False)
    deferred: set[str] = set()
    result, summary = _cast(model, precision, keep_nodes, deferred)
    del model
    stats = {"constants_converted": 0, "values_clipped": 0}
    low = _LOW[precision]

    def convert(data: bytes) -> bytes:
        return _to_low(np.frombuffer(data, dtype=np.float32), low, stats).tobytes()

    write_streamed(result, src_p.parent, dst, {name: convert for name in deferred})
    summary["values_clipped"] += stats["values_clipped"]
    _log_summary(summary, time.perf_counter() - t0)
    return summary


def _cast(model: onnx.ModelProto, precision: str, keep_nodes: Sequence[str],
          deferred: set[str] | None) -> tuple[onnx.ModelProto, dict[str, Any]]:
    if precision not in _LOW:
        raise InputError(f"cast_precision: unknown precision {precision!r}; use one of {sorted(_LOW)}")
    if model.functions:
        raise GraphError(f"cast_precision needs a graph without local functions ({len(model.functions)} found); "
                         "inline them first with onnx.inliner.inline_local_functions")
    before = node_count(model)
    with quiet_graphsurgeon() as gs:
        graph = gs.import_onnx(model)
        graph.toposort()
        flow = [n for n in graph.nodes if n.op in ("If", "Loop", "Scan")]
        if flow:
            raise GraphError(f"cast_precision does not handle control flow: {flow[0].op} node {flow[0].name!r}")
        caster = _Caster(graph, gs, precision, keep_nodes, deferred)
        caster.classify()
        caster.retype_low_nodes()
        caster.keep_outputs_fp32()
        caster.convert_edges()
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        result = gs.export_onnx(graph, do_type_check=False)
    keep_model_header(model, result)
    summary = {**caster.summary(), "nodes_before": before, "nodes_after": node_count(result)}
    return result, summary


def _log_summary(summary: dict[str, Any], seconds: float) -> None:
    logger.info("cast_precision(%s): %d -> %d nodes in %.2f s (%d low, fp32 kept: %s, %d casts inserted, %d "
                "Cast(to=FLOAT) rewritten)", summary["precision"], summary["nodes_before"], summary["nodes_after"],
                seconds, summary["low_nodes"], summary["fp32_by_reason"], summary["casts_inserted"],
                summary["casts_rewritten"])
    if summary["values_clipped"]:
        logger.warning("cast_precision: %d weight values exceeded the fp16 range and were clipped",
                       summary["values_clipped"])
