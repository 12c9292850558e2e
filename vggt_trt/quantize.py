"""Quantisation that reaches the engine: ModelOpt ONNX PTQ (int8 / fp8 / int4) and pre-export modes.

ONNX PTQ (:func:`quantize_onnx`) inserts explicit Q/DQ with ``modelopt.onnx.quantization`` (ONNX
Runtime calibration on the host by default: ``calibration_eps=("cpu",)``), calibrated on a
:class:`vggt_trt.calib.CalibrationSet`.
Exclusions are graph queries (:func:`default_exclusions`): the patch-embed Conv fed by the input,
the last compute layers before each graph output (the heads' final convs), and normalisations.
Results are cached by a key of the fp32 graph hash, precision, method, exclusions and the
calibration fingerprint + shape + preprocessing version.

Pre-export quant modes (``--quant-mode``, :func:`apply_quant_mode` then export, then
:func:`finalize_quant_mode_graph`). Every ``nn.Linear`` (``include`` narrows it) is replaced by
a module whose weights are stored quantised and export as ``DequantizeLinear`` (weight-only), or
as FP8 Q/DQ for ``modelopt-fp8``; the finaliser refuses a graph without the quantised weights.
The bitsandbytes emulations give bit-identical codes and scales to bitsandbytes 0.50.2's CPU
``quantize_4bit(blocksize=64, compress_statistics=False)`` and ``int8_vectorwise_quant`` (checked
by the tests whenever bitsandbytes is importable):

=====================  ==================================================  ======================================
mode                   what reaches the ONNX graph / engine                 where the numbers come from
=====================  ==================================================  ======================================
``none``               fp32 weights                                          -
``torch-int8-dynamic`` INT8 weights, per output channel, symmetric,          ``torch.ao`` ``PerChannelMinMaxObserver``
                       DQ(axis=1) before MatMul. Activations stay float:     (qint8, per_channel_symmetric: the
                       torch's runtime activation quantisation has no        ``per_channel_dynamic_qconfig`` grid)
                       TensorRT equivalent (weight-only INT8 instead).
``bitsandbytes-8bit``  INT8 weights, per output row, ``round(127 W/absmax)``  emulation of bitsandbytes' LLM.int8
                       (bitsandbytes' int8 weight grid); activations float,  weight grid (bitsandbytes is not
                       no outlier decomposition.                             used, so no GPU is needed)
``bitsandbytes-nf4``   INT4 weights, blocks of 64 along in-features:         emulated NF4 blockwise (absmax fp32,
                       the NF4 weights RE-PROJECTED onto the INT4 grid        no double quantisation), then INT4;
                       (TensorRT cannot dequantise a 16-entry code book).    both errors are reported
``bitsandbytes-fp4``   as nf4 with bitsandbytes' FP4 code book               as nf4
``modelopt-fp8``       FP8 E4M3 Q/DQ on Linear inputs, FP8 weights + DQ      ``modelopt.torch.quantization`` max
                       (per-tensor scales)                                   calibration on the given batches
=====================  ==================================================  ======================================

Order in a pipeline: ``apply_quant_mode`` -> export -> ``finalize_quant_mode_graph`` at once (an
ONNX simplifier would constant-fold the not yet folded 4-bit pattern into float weights). The
finaliser is idempotent: run it again after later passes to prove the quantised weights survived.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from .atomic import write_json_atomic
from .errors import GraphError, InputError, MissingDependencyError
from .metrics import accuracy_report  # re-exported: the convert stage takes it from here

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from .calib import CalibrationSet

log = logging.getLogger(__name__)

__all__ = ["PRECISIONS", "QUANT_MODES", "default_exclusions", "find_input_convs", "find_output_layers",
           "graph_sha256", "qdq_summary", "quantize_onnx", "apply_quant_mode", "fold_weight_dequant_to_dq",
           "finalize_quant_mode_graph", "accuracy_report"]

PRECISIONS = ("int8", "fp8", "int4")
QUANT_MODES = ("none", "torch-int8-dynamic", "bitsandbytes-8bit", "bitsandbytes-nf4", "bitsandbytes-fp4",
               "modelopt-fp8")
_METHODS = {"int8": ("max", "entropy"), "fp8": ("max", "entropy"), "int4": ("awq_clip", "rtn_dq")}
_COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "Attention", "Einsum"})
_SHAPE_OPS = frozenset({"Shape", "Size"})
NORM_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "BatchNormalization",
            "RMSNormalization", "SimplifiedLayerNormalization")
# Kept in FP32 when the rest of a Q/DQ graph goes to fp16 (high_precision_dtype="fp16"): norms (ViT
# "massive activations" overflow fp16 variances) and exp-type head activations (exp(x) > 65504 for x > 11).
FP32_OP_TYPES = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization",
                 "Exp", "Softplus")
_CACHE_FORMAT = 1
_EXTERNAL_THRESHOLD = 1 << 30  # bytes: larger graphs are saved with external data


# --------------------------------------------------------------------------- graph queries


def _load(model: "str | os.PathLike | onnx.ModelProto", with_data: bool = False) -> "onnx.ModelProto":
    import onnx

    if isinstance(model, onnx.ModelProto):
        return model
    if not Path(model).is_file():
        raise InputError(f"ONNX file does not exist: {model}")
    try:
        return onnx.load(os.fspath(model), load_external_data=with_data)
    except (OSError, onnx.onnx_cpp2py_export.checker.ValidationError, ValueError) as exc:
        raise GraphError(f"cannot load ONNX graph {model}: {exc}") from exc


def _consumers(graph: "onnx.GraphProto") -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def find_input_convs(model: "str | os.PathLike | onnx.ModelProto", input_name: str = "images") -> list[str]:
    """Conv nodes fed by graph input ``input_name`` through non-compute ops (the patch embed)."""
    graph = _load(model).graph
    if input_name not in {i.name for i in graph.input}:
        raise GraphError(f"graph has no input {input_name!r} (inputs: {[i.name for i in graph.input]})")
    consumers = _consumers(graph)
    found, seen, frontier = [], {input_name}, [input_name]
    while frontier:
        for node in consumers.get(frontier.pop(), []):
            if node.op_type in ("Conv", "ConvTranspose"):
                found.append(node.name)
            elif node.op_type not in _COMPUTE_OPS | _SHAPE_OPS:
                frontier.extend(o for o in node.output if o not in seen)
                seen.update(node.output)
    return sorted(set(found))


def find_output_layers(model: "str | os.PathLike | onnx.ModelProto",
                       op_types: Iterable[str] = ("Conv", "ConvTranspose")) -> list[str]:
    """Compute nodes of ``op_types`` whose output reaches a graph output with no compute op between."""
    graph = _load(model).graph
    producer = {o: n for n in graph.node for o in n.output}
    wanted, found = set(op_types), set()
    seen = {o.name for o in graph.output}
    frontier = list(seen)
    while frontier:
        node = producer.get(frontier.pop())
        if node is None:
            continue
        if node.op_type in _COMPUTE_OPS:
            if node.op_type in wanted:
                found.add(node.name)
            continue
        for name in node.input:
            if name and name not in seen:
                seen.add(name)
                frontier.append(name)
    return sorted(found)


def default_exclusions(model: "str | os.PathLike | onnx.ModelProto", input_name: str = "images",
                       output_op_types: Iterable[str] = ("Conv", "ConvTranspose"),
                       norm_ops: bool = True) -> dict[str, list[str]]:
    """Nodes and op types kept in high precision: ``patch_embed``, ``output_layers``, ``op_types``."""
    proto = _load(model)
    present = {n.op_type for n in proto.graph.node}
    unnamed = [n.op_type for n in proto.graph.node if not n.name]
    if unnamed:
        raise GraphError(f"{len(unnamed)} nodes have no name (e.g. {unnamed[:3]}); name them before "
                         "quantising so exclusions can refer to them")
    return {"patch_embed": find_input_convs(proto, input_name),
            "output_layers": find_output_layers(proto, output_op_types),
            "op_types": [t for t in NORM_OPS if t in present] if norm_ops else []}


# --------------------------------------------------------------------------- summaries


def _external_files(path: Path, proto: "onnx.ModelProto") -> list[Path]:
    locs = set()
    for t in _constants(proto).values():
        for entry in t.external_data:
            if entry.key == "location":
                locs.add(entry.value)
    return [path.parent / loc for loc in sorted(locs)]


def graph_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of an ONNX file and its external data files (in location order)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in [path] + _external_files(path, _load(path)):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 23), b""):
                h.update(chunk)
    return h.hexdigest()


def _constants(proto: "onnx.ModelProto") -> dict[str, Any]:
    out = {t.name: t for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    out[node.output[0]] = a.t
    return out


def _tensor_bytes(t: Any) -> int:
    from onnx import TensorProto, helper

    numel = math.prod(t.dims)
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4, getattr(TensorProto, "FLOAT4E2M1", -1)):
        return (numel + 1) // 2
    if t.data_type == TensorProto.STRING:
        return 0
    return numel * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize


def qdq_summary(onnx_path: "str | os.PathLike | onnx.ModelProto") -> dict[str, Any]:
    """Q/DQ counts, quantised weight initializers by dtype, and weight bytes (stored and as fp32)."""
    from onnx import TensorProto

    proto = _load(onnx_path)
    consts = _constants(proto)
    name_of = TensorProto.DataType.Name
    float_types = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    q = dq = act_q = 0
    quantized: dict[str, dict[str, int]] = {}
    at_build: dict[str, int] = {}
    for node in proto.graph.node:
        if node.op_type.endswith("DequantizeLinear"):
            dq += 1
            t = consts.get(node.input[0])
            if t is not None and t.data_type not in float_types:
                entry = quantized.setdefault(name_of(t.data_type), {"count": 0, "bytes": 0})
                entry["count"] += 1
                entry["bytes"] += _tensor_bytes(t)
        elif node.op_type.endswith("QuantizeLinear"):
            q += 1
            if node.input[0] in consts:
                zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                key = name_of(zp.data_type) if zp is not None else "UINT8"
                at_build[key] = at_build.get(key, 0) + 1
            else:
                act_q += 1
    stored = sum(_tensor_bytes(t) for t in consts.values())
    as_fp32 = sum(4 * math.prod(t.dims) if (t.data_type in float_types or name_of(t.data_type) in quantized)
                  else _tensor_bytes(t) for t in consts.values())
    by_dtype: dict[str, int] = {}
    for t in consts.values():
        by_dtype[name_of(t.data_type)] = by_dtype.get(name_of(t.data_type), 0) + _tensor_bytes(t)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"quantize_linear": q, "dequantize_linear": dq, "activation_quantize_linear": act_q,
            "quantized_weights": quantized, "weights_quantized_at_build": at_build,
            "quantized_weight_count": sum(v["count"] for v in quantized.values()),
            "weight_bytes": stored, "weight_bytes_if_fp32": as_fp32, "weight_bytes_by_dtype": by_dtype,
            "opset": opset}


# --------------------------------------------------------------------------- ONNX PTQ


def _save_model_atomic(proto: "onnx.ModelProto", path: Path, external: bool | None = None) -> Path:
    """Save to a temporary folder beside ``path``; move the data file first and the .onnx last."""
    import onnx

    if external is None:
        external = sum(_tensor_bytes(t) for t in proto.graph.initializer) > _EXTERNAL_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        onnx.save_model(proto, os.fspath(tmp / path.name), save_as_external_data=external,
                        all_tensors_to_one_file=True, location=f"{path.name}.data", size_threshold=1024)
        if external:  # never leave the old .onnx beside a new data file
            path.unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == path.name):
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _stage_input(src: Path, work: Path) -> Path:
    """A private copy of a single-file graph in ``work`` (ModelOpt writes its intermediates beside its
    input). Graphs with external data are used in place: onnx refuses data behind links, and
    copying gigabytes is worse than ModelOpt's short-lived ``<stem>_*.onnx`` files beside them."""
    if _external_files(src, _load(src)):
        log.info("ModelOpt writes temporary files beside %s (external data is not copied)", src)
        return src
    shutil.copyfile(src, work / src.name)
    return work / src.name


def _calib_array(calib: Any, shape: tuple[int, ...]) -> tuple[np.ndarray | None, dict[str, Any] | None]:
    """(flat [B*num_cams, 3, H, W] array, cache-key part) from a CalibrationSet or an array.

    ``shape`` is the graph input's; 0 marks a dynamic dimension, which matches any size.
    """
    if calib is None:
        return None, None
    matches = lambda found: len(found) == len(shape) and all(s in (0, f) for s, f in zip(shape, found))  # noqa: E731
    want = ", ".join(str(d) if d else "?" for d in shape)
    if hasattr(calib, "load") and hasattr(calib, "key"):
        if not matches(tuple(calib.batch_shape)):
            raise InputError(f"calibration batches are {list(calib.batch_shape)} but the graph input is [{want}]")
        return calib.load().reshape((-1, *calib.batch_shape[1:])), calib.key()
    arr = np.asarray(calib, dtype=np.float32)
    if arr.ndim not in (4, 5) or not matches(arr.shape[-4:]):
        raise InputError(f"calibration batches: expected [B, {want}] or [{want}], found {list(arr.shape)}")
    batch_shape = arr.shape[-4:]
    flat = arr.reshape((-1, *batch_shape[1:]))
    return flat, {"kind": "array", "fingerprint": hashlib.sha256(flat.tobytes()).hexdigest(),
                  "batch_shape": list(batch_shape)}


def quantize_onnx(
    fp32_onnx_path: str | os.PathLike,
    out_path: str | os.PathLike,
    precision: str,
    calib_batches: "CalibrationSet | np.ndarray | None",
    input_name: str = "images",
    *,
    method: str | None = None,
    exclude_nodes: Sequence[str] = (),
    exclude_op_types: Sequence[str] | None = None,
    auto_exclude: bool = True,
    high_precision_dtype: str = "fp16",
    block_size: int | None = None,
    dq_only: bool = True,
    cache_dir: str | os.PathLike | None = None,
    use_external_data: bool | None = None,
    calibration_eps: Sequence[str] = ("cpu",),
    fp32_op_types: Sequence[str] = FP32_OP_TYPES,
) -> dict[str, Any]:
    """Insert calibrated Q/DQ with ModelOpt; returns a JSON-able report (exclusions, Q/DQ summary, key).

    ``precision``: int8 / fp8 (``method`` max (default) or entropy; activations and weights) or
    int4 (awq_clip (default) or rtn_dq; W4A16 blockwise on MatMul weights). ``calib_batches``
    is needed except for int4 rtn_dq. ``exclude_nodes`` are exact node names added to
    :func:`default_exclusions` (``auto_exclude``); ``exclude_op_types`` replaces the
    normalisation op types. ``dq_only`` stores quantised weights in the graph (INT8/FP8
    initializers + DQ). With ``cache_dir``, a graph calibrated under the same key is reused.
    ``calibration_eps``: ONNX Runtime providers for calibration, in ModelOpt's spelling ("cpu",
    "cuda:0", "trt"); graphs over 2 GB use external data (automatic, or ``use_external_data``).
    ``fp32_op_types`` stay FP32 when ``high_precision_dtype`` is fp16/bf16 (int8/fp8 only).
    """
    t0 = time.perf_counter()
    src, out = Path(fp32_onnx_path), Path(out_path)
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {PRECISIONS} for Q/DQ quantisation, found {precision!r}")
    method = method or _METHODS[precision][0]
    if method not in _METHODS[precision]:
        raise InputError(f"{precision} calibration method must be one of {_METHODS[precision]}, found {method!r}")
    if out.suffix != ".onnx" or out.resolve() == src.resolve():
        raise InputError(f"output must be a new .onnx path, found {out}")
    proto = _load(src)
    inputs = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    if input_name not in inputs:
        raise InputError(f"graph {src} has no input {input_name!r} (inputs: {list(inputs)})")
    shape = tuple(inputs[input_name])
    flat, calib_key = _calib_array(calib_batches, shape)
    if flat is None and not (precision == "int4" and method == "rtn_dq"):
        raise InputError(f"{precision}/{method} needs calibration data (calib.calibration_set(None, ...) "
                         "gives synthetic data, with a warning)")
    excl = (default_exclusions(proto, input_name) if auto_exclude
            else {"patch_embed": [], "output_layers": [], "op_types": []})
    if exclude_op_types is not None:
        excl["op_types"] = list(exclude_op_types)
    names = {n.name for n in proto.graph.node}
    unknown = [n for n in exclude_nodes if n not in names]
    if unknown:
        raise InputError(f"exclude_nodes not in the graph: {unknown}")
    nodes = sorted(set(excl["patch_embed"]) | set(excl["output_layers"]) | set(exclude_nodes))
    if precision == "int4":
        # ModelOpt 0.47 int4 blocks a transposed Gemm weight ([N, K], transB=1) along the wrong axis
        # (rtn_dq: across output channels; awq_clip: an invalid scale shape), so those stay fp.
        gemm_t = [n.name for n in proto.graph.node if n.op_type == "Gemm" and any(
            a.name == "transB" and a.i == 1 for a in n.attribute) and n.name not in nodes]
        if gemm_t:
            log.warning("int4: keeping %d Gemm node(s) with transB=1 in high precision (ModelOpt blocks "
                        "their weights along the wrong axis): %s", len(gemm_t), gemm_t)
            excl["transposed_gemm"] = gemm_t
            nodes = sorted(set(nodes) | set(gemm_t))
    present = {n.op_type for n in proto.graph.node}
    keep32 = sorted(t for t in set(fp32_op_types) if t in present) if precision != "int4" else []
    key = {"format": _CACHE_FORMAT, "fp32_graph_sha256": graph_sha256(src), "precision": precision,
           "method": method, "calibration": calib_key, "input": {input_name: list(shape)},
           "exclude_nodes": nodes, "exclude_op_types": sorted(excl["op_types"]),
           "high_precision_dtype": high_precision_dtype, "block_size": block_size, "dq_only": dq_only,
           "calibration_eps": list(calibration_eps), "fp32_op_types": keep32, "modelopt": _modelopt_version()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    report: dict[str, Any] = {"precision": precision, "method": method, "input": str(src), "output": str(out),
                              "exclusions": {**excl, "extra_nodes": list(exclude_nodes)},
                              "calibration": calib_key, "fp32_op_types": keep32, "cache_key": digest,
                              "cache_hit": False}
    entry = Path(cache_dir) / f"calibration-{precision}-{digest[:16]}.onnx" if cache_dir else None
    if entry is not None and entry.is_file() and _read_json(entry.with_suffix(".json")) == key:
        log.info("reusing calibrated %s graph %s (cache key %s)", precision, entry, digest[:16])
        _save_model_atomic(_load(entry, with_data=True), out, use_external_data)
        report["cache_hit"] = True
    else:
        target = entry if entry is not None else out
        if entry is not None:
            entry.with_suffix(".json").unlink(missing_ok=True)
        batch_shape = calib_key["batch_shape"] if calib_key else [d or 1 for d in shape]
        _run_modelopt(src, target, precision, method, flat, batch_shape, input_name, nodes, excl["op_types"],
                      high_precision_dtype, block_size, dq_only, use_external_data, list(calibration_eps), keep32)
        if entry is not None:
            write_json_atomic(entry.with_suffix(".json"), key)
            _save_model_atomic(_load(entry, with_data=True), out, use_external_data)
    summary = qdq_summary(out)
    if summary["dequantize_linear"] == 0:
        raise GraphError(f"{precision} quantisation of {src} inserted no Q/DQ nodes")
    report["qdq"] = summary
    report["weight_bytes_before"] = qdq_summary(proto)["weight_bytes"]
    report["weight_bytes_after"] = summary["weight_bytes"]
    report["seconds"] = round(time.perf_counter() - t0, 3)
    log.info("%s %s: %d Q / %d DQ, %d quantised weights, weights %.1f -> %.1f MB in %.1f s%s", precision,
             method, summary["quantize_linear"], summary["dequantize_linear"], summary["quantized_weight_count"],
             report["weight_bytes_before"] / 1e6, summary["weight_bytes"] / 1e6, report["seconds"],
             " (cached)" if report["cache_hit"] else "")
    return report


def _modelopt_version() -> str:
    try:
        from importlib.metadata import version

        return version("nvidia-modelopt")
    except ImportError:
        return "unknown"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_modelopt(src: Path, out: Path, precision: str, method: str, flat: np.ndarray | None,
                  batch_shape: Sequence[int], input_name: str, nodes: Sequence[str], op_types: Sequence[str],
                  hp_dtype: str, block_size: int | None, dq_only: bool, external: bool | None, eps: list[str],
                  keep32: list[str]) -> None:
    try:
        import modelopt.onnx.quantization as moq
    except ImportError as exc:
        raise MissingDependencyError(
            f"ONNX {precision} quantisation needs NVIDIA ModelOpt: pip install -r requirements-quant.txt ({exc})"
        ) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".quant-", dir=out.parent))
    try:
        (work / "in").mkdir()
        (work / "out").mkdir()
        staged = _stage_input(src, work / "in")
        big = external if external is not None else (
            bool(_external_files(src, _load(src))) or src.stat().st_size > _EXTERNAL_THRESHOLD)
        kwargs: dict[str, Any] = dict(
            quantize_mode=precision, calibration_method=method, calibration_eps=eps,
            nodes_to_exclude=[f"^{re.escape(n)}$" for n in nodes] or None, use_external_data_format=big,
            output_path=os.fspath(work / "out" / out.name), high_precision_dtype=hp_dtype,
            log_level="DEBUG" if log.isEnabledFor(logging.DEBUG) else "WARNING")
        if flat is not None:
            kwargs["calibration_data"] = {input_name: flat}
            kwargs["calibration_shapes"] = f"{input_name}:{'x'.join(map(str, batch_shape))}"
        if precision in ("int8", "fp8"):
            kwargs.update(op_types_to_exclude=list(op_types) or None, dq_only=dq_only,
                          op_types_to_exclude_fp16=keep32 or None)
        elif block_size is not None:
            kwargs["block_size"] = int(block_size)
        log.info("ModelOpt %s/%s: excluding %d nodes and op types %s", precision, method, len(nodes), list(op_types))
        try:
            moq.quantize(os.fspath(staged), **kwargs)
        except (ValueError, AssertionError, RuntimeError, KeyError) as exc:
            raise GraphError(f"ModelOpt {precision}/{method} quantisation of {src} failed: {exc}") from exc
        produced = work / "out" / out.name
        if not produced.is_file():
            raise GraphError(f"ModelOpt {precision}/{method} wrote no graph for {src}")
        produced_files = sorted((f for f in (work / "out").iterdir() if f.name.startswith(out.name)),
                                key=lambda p: p.name == out.name)  # data first, the .onnx last
        if len(produced_files) > 1:
            out.unlink(missing_ok=True)  # never an old .onnx beside new external data
        for f in produced_files:
            os.replace(f, out.parent / f.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- pre-export quant modes

_BNB_BLOCK = 64
_BNB_CODES = {  # bitsandbytes' 4-bit code books (bitsandbytes/functional.py get_4bit_type)
    "nf4": (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0),
    "fp4": (0.0, 0.0052083333, 0.6666666667, 1.0, 0.3333333333, 0.5, 0.1666666667, 0.25,
            -0.0, -0.0052083333, -0.6666666667, -1.0, -0.3333333333, -0.5, -0.1666666667, -0.25),
}
_FP8_MAX = 448.0


def _qd() -> Any:
    import torch
    import torch.ao.quantization.fx._decomposed  # registers torch.ops.quantized_decomposed

    return torch.ops.quantized_decomposed


@functools.lru_cache(maxsize=None)
def _module_classes() -> tuple[type, type]:
    """(WeightOnlyLinear, FP8Linear), defined once on first use so torch is imported lazily."""
    import torch
    from torch import nn

    class WeightOnlyLinear(nn.Module):
        """Linear with INT8 per-channel or INT4 blockwise weights; exports as DequantizeLinear + MatMul."""

        def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     block: int | None):
            super().__init__()
            self.block = block
            self.register_buffer("qweight", qweight)  # int8 [K, N], or [K/block, block, N] holding int4
            self.register_buffer("scale", scale)  # float32 [N] or [K/block, 1, N]
            self.register_buffer("zero_point", torch.zeros(scale.numel() if block is None else 1, dtype=torch.int32))
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            qd = _qd()
            if self.block is None:
                w = qd.dequantize_per_channel(self.qweight, self.scale, self.zero_point, 1, -128, 127, torch.int8)
            else:
                g, b, n = self.qweight.shape
                w = (qd.dequantize_per_tensor(self.qweight, 1.0, 0, -8, 7, torch.int8) * self.scale).reshape(g * b, n)
            y = torch.matmul(x, w.to(x.dtype))
            return y if self.bias is None else y + self.bias

    class FP8Linear(nn.Module):
        """Linear with FP8 E4M3 weights and per-tensor FP8 Q/DQ on its input (ModelOpt-calibrated)."""

        def __init__(self, weight: torch.Tensor, w_scale: float, in_scale: float | None, bias: torch.Tensor | None):
            super().__init__()
            self.w_scale, self.in_scale = float(w_scale), None if in_scale is None else float(in_scale)
            q = (weight.detach().float().t() / self.w_scale).clamp(-_FP8_MAX, _FP8_MAX)
            self.register_buffer("qweight", q.to(torch.float8_e4m3fn).contiguous())  # [K, N]
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            qd, f8 = _qd(), torch.float8_e4m3fn
            if self.in_scale is not None:
                if torch.onnx.is_in_onnx_export():
                    x = qd.dequantize_per_tensor(qd.quantize_per_tensor(x, self.in_scale, 0, -448, 448, f8),
                                                 self.in_scale, 0, -448, 448, f8)
                else:  # quantize_per_tensor's eager kernel rounds to integers first; this is the ONNX rule
                    x = (x.float() / self.in_scale).clamp(-_FP8_MAX, _FP8_MAX).to(f8).to(x.dtype) * self.in_scale
            w = qd.dequantize_per_tensor(self.qweight, self.w_scale, 0, -448, 448, f8)
            y = torch.matmul(x, w.to(x.dtype))
            return y if self.bias is None else y + self.bias

    return WeightOnlyLinear, FP8Linear


def _codebook_roundtrip(w: np.ndarray, code: Sequence[float], block: int) -> np.ndarray:
    """bitsandbytes-style blockwise quantise/dequantise of ``w [N, K]`` (blocks along K)."""
    n, k = w.shape
    blocks = w.reshape(n, k // block, block)
    absmax = np.abs(blocks).max(-1, keepdims=True)
    normed = np.divide(blocks, absmax, out=np.zeros_like(blocks), where=absmax > 0)
    levels = np.unique(np.asarray(code, dtype=np.float32))
    idx = np.searchsorted((levels[1:] + levels[:-1]) / 2, normed)
    return (levels[idx] * absmax).reshape(n, k).astype(np.float32)


def _int4_blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric INT4 (scale = absmax/7) of ``w [N, K]`` in blocks along K: q [K/b, b, N], scale [K/b, 1, N]."""
    n, k = w.shape
    blocks = w.T.reshape(k // block, block, n)
    scale = np.abs(blocks).max(1, keepdims=True) / 7.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(blocks / scale), -8, 7).astype(np.int8), scale


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))


def _quantize_linear(mode: str, lin: Any, cls: type) -> tuple[Any, dict[str, Any]]:
    import torch

    w = lin.weight.detach().float().cpu()
    wn = w.numpy()
    info: dict[str, Any] = {"shape": list(w.shape)}
    if mode == "torch-int8-dynamic":
        from torch.ao.quantization.observer import PerChannelMinMaxObserver

        obs = PerChannelMinMaxObserver(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric)
        obs(w)
        scale = obs.calculate_qparams()[0].float()  # zero point is 0 (symmetric)
        q = torch.round(w / scale[:, None]).clamp(-128, 127).to(torch.int8)
        info.update(dtype="INT8", weight_rel_error=_rel((q.float() * scale[:, None]).numpy(), wn))
        mod = cls(q.t().contiguous(), scale, lin.bias, None)
    elif mode == "bitsandbytes-8bit":
        absmax = np.abs(wn).max(1)
        absmax = np.where(absmax > 0, absmax, 1.0).astype(np.float32)
        q = np.rint(wn * (127.0 / absmax[:, None])).astype(np.int8)
        info.update(dtype="INT8", weight_rel_error=_rel(q * (absmax[:, None] / 127.0), wn))
        mod = cls(torch.from_numpy(np.ascontiguousarray(q.T)), torch.from_numpy(absmax / 127.0), lin.bias, None)
    else:  # bitsandbytes-nf4 / -fp4
        grid = _codebook_roundtrip(wn, _BNB_CODES[mode.rsplit("-", 1)[1]], _BNB_BLOCK)
        q, scale = _int4_blocks(grid, _BNB_BLOCK)
        graph_w = (q * scale).reshape(wn.shape[1], wn.shape[0]).T
        info.update(dtype="INT4", block_size=_BNB_BLOCK, weight_rel_error=_rel(graph_w, wn),
                    bnb_grid_rel_error=_rel(grid, wn), reprojection_rel_error=_rel(graph_w, grid))
        mod = cls(torch.from_numpy(q), torch.from_numpy(scale), lin.bias, _BNB_BLOCK)
    return mod.to(lin.weight.device), info


def _set_module(root: Any, name: str, module: Any) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def apply_quant_mode(
    model: "torch.nn.Module",
    mode: str,
    calib_batches: "CalibrationSet | np.ndarray | None" = None,
    include: Callable[[str, Any], bool] | None = None,
) -> dict[str, Any]:
    """Quantise ``model``'s ``nn.Linear`` layers in place for ``mode`` (see the module table).

    Returns the mode report: implementation, graph format, per-layer dtype and weight error,
    layers kept in float and why. ``modelopt-fp8`` needs ``calib_batches``. After export, pass
    the report to :func:`finalize_quant_mode_graph`, which checks the graph really holds them.
    """
    if mode not in QUANT_MODES:
        raise InputError(f"--quant-mode must be one of {', '.join(QUANT_MODES)}, found {mode!r}")
    report: dict[str, Any] = {"mode": mode, "quantized_layers": 0, "layers": {}, "kept_float": {}}
    if mode == "none":
        report.update(implementation="none", graph_format="float weights")
        return report
    from torch import nn

    _qd()  # the quantized_decomposed ops must exist before torch.onnx.export builds its op registry
    linears = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and (include is None or include(n, m))]
    if not linears:
        raise InputError(f"quant mode {mode}: the model has no nn.Linear layers to quantise")
    if mode == "modelopt-fp8":
        return _apply_modelopt_fp8(model, linears, calib_batches, report)
    if mode.startswith("bitsandbytes"):
        report["implementation"] = (f"EMULATION of bitsandbytes' {mode.split('-', 1)[1]} weight quantisation in numpy "
                                    "(bitsandbytes is neither used nor needed: its layers do not export to ONNX and "
                                    "its kernels target CUDA GPUs)")
        log.warning("quant mode %s: %s", mode, report["implementation"])
    else:
        report["implementation"] = "torch.ao PerChannelMinMaxObserver (qint8, per_channel_symmetric) weight grid"
    if mode.endswith(("nf4", "fp4")):
        report["graph_format"] = (f"INT4 weights, blocks of {_BNB_BLOCK} along in-features, DequantizeLinear "
                                  f"(block_size={_BNB_BLOCK}) + MatMul: the {mode.rsplit('-', 1)[1].upper()} "
                                  "weights RE-PROJECTED onto the INT4 grid (TensorRT cannot dequantise a code book)")
        log.warning("quant mode %s: TensorRT cannot dequantise the %s code book; weights are re-projected onto "
                    "INT4 blockwise (block %d); see weight_rel_error vs bnb_grid_rel_error", mode,
                    mode.rsplit("-", 1)[1].upper(), _BNB_BLOCK)
    else:
        report["graph_format"] = ("INT8 weights per output channel + DequantizeLinear(axis=1) + MatMul; activations "
                                  "stay float (weight-only: TensorRT has no dynamic INT8 activation quantisation)")
    cls, _ = _module_classes()
    for name, lin in linears:
        if mode.endswith(("nf4", "fp4")) and lin.in_features % _BNB_BLOCK:
            report["kept_float"][name] = f"in_features {lin.in_features} is not a multiple of {_BNB_BLOCK}"
            continue
        mod, info = _quantize_linear(mode, lin, cls)
        _set_module(model, name, mod)
        report["layers"][name] = info
    return _finish_report(report)


def _finish_report(report: dict[str, Any]) -> dict[str, Any]:
    layers = report["layers"]
    report["quantized_layers"] = len(layers)
    if not layers:
        raise InputError(f"quant mode {report['mode']}: no layer could be quantised ({report['kept_float']})")
    report["weight_rel_error_mean"] = float(np.mean([v["weight_rel_error"] for v in layers.values()]))
    if report["kept_float"]:
        log.warning("quant mode %s: %d Linear layers stay float: %s", report["mode"], len(report["kept_float"]),
                    report["kept_float"])
    log.info("quant mode %s: %d Linear layers quantised (%s); mean weight rel error %.4f", report["mode"],
             len(layers), report["graph_format"], report["weight_rel_error_mean"])
    return report


def _apply_modelopt_fp8(model: Any, linears: list[tuple[str, Any]], calib: Any,
                        report: dict[str, Any]) -> dict[str, Any]:
    import torch

    try:
        import modelopt.torch.quantization as mtq
    except ImportError as exc:
        raise MissingDependencyError(f"quant mode modelopt-fp8 needs modelopt.torch (pip install -r "
                                     f"requirements-quant.txt): {exc}") from exc
    if calib is None:
        raise InputError("quant mode modelopt-fp8 needs calibration batches (calib.calibration_set(...))")
    batches = calib.load() if hasattr(calib, "load") else np.asarray(calib, dtype=np.float32)
    fp8 = {"num_bits": (4, 3), "axis": None}
    cfg = {"algorithm": "max", "quant_cfg": [{"quantizer_name": "*", "enable": False}] + [
        {"quantizer_name": f"{n}.{q}", "cfg": fp8}
        for n, _ in linears for q in ("weight_quantizer", "input_quantizer")]}
    device = next(model.parameters()).device

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for b in batches.reshape((-1,) + batches.shape[-4:]):
                m(torch.from_numpy(np.ascontiguousarray(b)).to(device))

    mtq.quantize(model, cfg, forward_loop=forward_loop)
    _, cls = _module_classes()
    for name, _ in linears:
        qlin = model.get_submodule(name)
        w_amax = getattr(qlin.weight_quantizer, "amax", None)
        in_amax = getattr(qlin.input_quantizer, "amax", None)
        if w_amax is None or in_amax is None or float(w_amax) <= 0 or float(in_amax) <= 0:
            report["kept_float"][name] = "no calibrated amax (layer not reached by the calibration forward?)"
            continue
        w = qlin.weight.detach()
        mod = cls(w, float(w_amax) / _FP8_MAX, float(in_amax) / _FP8_MAX, qlin.bias).to(w.device)
        w_graph = mod.qweight.float().t() * mod.w_scale
        report["layers"][name] = {"shape": list(w.shape), "dtype": "FLOAT8E4M3FN", "input_amax": float(in_amax),
                                  "weight_amax": float(w_amax),
                                  "weight_rel_error": _rel(w_graph.cpu().numpy(), w.float().cpu().numpy())}
        _set_module(model, name, mod)
    report.update(implementation=f"modelopt.torch.quantization max calibration on {len(batches)} batches",
                  graph_format="FP8 E4M3 QuantizeLinear/DequantizeLinear on Linear inputs, FP8 weights + "
                               "DequantizeLinear (per-tensor scales)")
    return _finish_report(report)


# --------------------------------------------------------------------------- graph passes


def fold_weight_dequant_to_dq(model: "onnx.ModelProto") -> dict[str, int]:
    """Rewrite ``DQ(int8 [G,B,N], 1) -> Mul(scale [G,1,N]) -> Reshape([G*B,N])`` into one blockwise INT4 DQ.

    The export pattern of :func:`apply_quant_mode`'s 4-bit layers. Raises the opset to what the
    quantised types need (INT4 blockwise: 21, FP8: 19). Works in place; returns counts.
    """
    import ml_dtypes
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    consts = _constants(model)
    inits = {t.name: t for t in graph.initializer}
    consumers = _consumers(graph)
    folded, dead = 0, set()
    for node in list(graph.node):
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.data_type != TensorProto.INT8:
            continue
        if len(q.dims) != 3 or len(consumers.get(node.output[0], [])) != 1:
            continue
        scale_ok = float(numpy_helper.to_array(consts[node.input[1]])) == 1.0 if node.input[1] in consts else False
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        mul = consumers[node.output[0]][0]
        if not scale_ok or (zp is not None and np.any(numpy_helper.to_array(zp))) or mul.op_type != "Mul":
            continue
        s_name = mul.input[1] if mul.input[0] == node.output[0] else mul.input[0]
        nxt = consumers.get(mul.output[0], [])
        if s_name not in consts or len(nxt) != 1 or nxt[0].op_type != "Reshape":
            continue
        g, b, n = q.dims
        scale = numpy_helper.to_array(consts[s_name])
        shape = numpy_helper.to_array(consts[nxt[0].input[1]]) if nxt[0].input[1] in consts else None
        qa = numpy_helper.to_array(q)
        if scale.shape != (g, 1, n) or shape is None or list(shape) != [g * b, n] or qa.min() < -8 or qa.max() > 7:
            continue
        q_new = numpy_helper.from_array(qa.reshape(g * b, n).astype(ml_dtypes.int4), f"{q.name}_int4")
        s_new = numpy_helper.from_array(scale.reshape(g, n).astype(np.float32), f"{s_name}_blocks")
        dq = helper.make_node("DequantizeLinear", [q_new.name, s_new.name], [nxt[0].output[0]],
                              name=f"{node.name}_int4_block", axis=0, block_size=int(b))
        graph.initializer.extend([q_new, s_new])
        graph.node.insert(list(graph.node).index(node), dq)
        dead.update(id(x) for x in (node, mul, nxt[0]))
        folded += 1
    keep = [n for n in graph.node if id(n) not in dead]
    del graph.node[:]
    graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    kinds = {t.data_type for t in graph.initializer}
    fp8 = {TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2}
    need = 21 if folded or TensorProto.INT4 in kinds else 19 if kinds & fp8 else 0
    _ensure_opset(model, need)
    return {"int4_block_dq_folded": folded, "initializers_removed": len(unused)}


def _ensure_opset(model: "onnx.ModelProto", target: int) -> None:
    import onnx

    current = next((o for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if current is None or current.version >= target:
        return
    breaking = sorted({n.op_type for n in model.graph.node if n.op_type in ("GridSample", "DFT")})
    try:
        converted = onnx.version_converter.convert_version(model, target)
        model.CopyFrom(converted)
        log.info("converted the graph from opset %d to %d", current.version, target)
    except (ValueError, RuntimeError) as exc:
        if breaking:
            raise GraphError(f"cannot raise opset {current.version} -> {target} for quantised types: the converter "
                             f"failed ({exc}) and {breaking} changed meaning in between") from exc
        log.info("opset %d -> %d by renumbering (converter: %s; no op in this graph changed meaning)",
                 current.version, target, exc)
        current.version = target


def finalize_quant_mode_graph(onnx_path: str | os.PathLike, report: dict[str, Any],
                              out_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Fold the exported quant-mode graph into TensorRT form, save it, and prove the weights are quantised.

    Raises :class:`GraphError` when the graph holds fewer quantised weights than the mode
    quantised in torch (never fp32 weights under a quantised label). Returns the report with
    ``graph`` (:func:`qdq_summary`) and ``fold`` counts added.
    """
    src = Path(onnx_path)
    proto = _load(src, with_data=True)
    fold = fold_weight_dequant_to_dq(proto) if report.get("mode", "none") != "none" else {}
    summary = qdq_summary(proto)
    expected = int(report.get("quantized_layers", 0))
    if report.get("mode", "none") != "none" and summary["quantized_weight_count"] < expected:
        raise GraphError(
            f"quant mode {report['mode']}: {expected} layers were quantised in torch but the graph {src} holds "
            f"{summary['quantized_weight_count']} quantised weights ({summary['quantized_weights']}); refusing to "
            "label float weights as quantised")
    dst = _save_model_atomic(proto, Path(out_path) if out_path else src)
    log.info("quant mode %s graph %s: %d Q / %d DQ, quantised weights %s, weights %.1f MB (%.1f MB as fp32)",
             report.get("mode"), dst, summary["quantize_linear"], summary["dequantize_linear"],
             summary["quantized_weights"], summary["weight_bytes"] / 1e6, summary["weight_bytes_if_fp32"] / 1e6)
    return {**report, "graph": summary, "fold": fold, "onnx": str(dst)}
