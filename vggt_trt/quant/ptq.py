"""Quantisation that reaches the engine: ModelOpt ONNX PTQ (int8 / fp8 / int4) and pre-export modes.

ONNX PTQ (:func:`quantize_onnx`) inserts explicit Q/DQ with ``modelopt.onnx.quantization`` (ONNX
Runtime calibration on the host by default: ``calibration_eps=("cpu",)``), calibrated on a
:class:`vggt_trt.quant.calib.CalibrationSet`.
Exclusions are graph queries (:func:`default_exclusions`): the patch-embed Conv fed by the input,
the last compute layers before each graph output (the heads' final convs), and normalisations.
Results are cached by a key of the fp32 graph hash, precision, method, exclusions and the
calibration fingerprint + shape + preprocessing version.

Pre-export quant modes (``--quant-mode``) live in :mod:`vggt_trt.quant.modes`.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from ..accuracy import accuracy_table
from ..atomic import write_json_atomic
from ..errors import GraphError, InputError, MissingDependencyError
from ..graph.io import (EXTERNAL_DATA_THRESHOLD, as_model, constant_tensors, consumers, external_data_files, load_onnx,
                        onnx_sha256, save_onnx)
from ..precisions import QDQ_PRECISIONS
from .calib import synthetic_images

if TYPE_CHECKING:  # pragma: no cover
    import onnx

    from .calib import CalibrationSet

log = logging.getLogger(__name__)

__all__ = ["default_exclusions", "find_input_convs", "find_output_layers",
           "qdq_summary", "quantize_onnx", "accuracy_report"]

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


# --------------------------------------------------------------------------- graph queries


def find_input_convs(model: "str | os.PathLike | onnx.ModelProto", input_name: str = "images") -> list[str]:
    """Conv nodes fed by graph input ``input_name`` through non-compute ops (the patch embed)."""
    graph = as_model(model).graph
    if input_name not in {i.name for i in graph.input}:
        raise GraphError(f"graph has no input {input_name!r} (inputs: {[i.name for i in graph.input]})")
    users = consumers(graph)
    found, seen, frontier = [], {input_name}, [input_name]
    while frontier:
        for node in users.get(frontier.pop(), []):
            if node.op_type in ("Conv", "ConvTranspose"):
                found.append(node.name)
            elif node.op_type not in _COMPUTE_OPS | _SHAPE_OPS:
                frontier.extend(o for o in node.output if o not in seen)
                seen.update(node.output)
    return sorted(set(found))


def find_output_layers(model: "str | os.PathLike | onnx.ModelProto",
                       op_types: Iterable[str] = ("Conv", "ConvTranspose")) -> list[str]:
    """Compute nodes of ``op_types`` whose output reaches a graph output with no compute op between."""
    graph = as_model(model).graph
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
    proto = as_model(model)
    present = {n.op_type for n in proto.graph.node}
    unnamed = [n.op_type for n in proto.graph.node if not n.name]
    if unnamed:
        raise GraphError(f"{len(unnamed)} nodes have no name (e.g. {unnamed[:3]}); name them before "
                         "quantising so exclusions can refer to them")
    return {"patch_embed": find_input_convs(proto, input_name),
            "output_layers": find_output_layers(proto, output_op_types),
            "op_types": [t for t in NORM_OPS if t in present] if norm_ops else []}


# --------------------------------------------------------------------------- summaries


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

    proto = as_model(onnx_path)
    consts = constant_tensors(proto)
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


def _stage_input(src: Path, work: Path) -> Path:
    """A private copy of a single-file graph in ``work`` (ModelOpt writes its intermediates beside its
    input). Graphs with external data are used in place: onnx refuses data behind links, and
    copying gigabytes is worse than ModelOpt's short-lived ``<stem>_*.onnx`` files beside them."""
    if external_data_files(src):
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
    if precision not in QDQ_PRECISIONS:
        raise InputError(f"precision must be one of {QDQ_PRECISIONS} for Q/DQ quantisation, found {precision!r}")
    method = method or _METHODS[precision][0]
    if method not in _METHODS[precision]:
        raise InputError(f"{precision} calibration method must be one of {_METHODS[precision]}, found {method!r}")
    if out.suffix != ".onnx" or out.resolve() == src.resolve():
        raise InputError(f"output must be a new .onnx path, found {out}")
    if not src.is_file():
        raise InputError(f"ONNX file does not exist: {src}")
    proto = as_model(src)
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
    key = {"format": _CACHE_FORMAT, "fp32_graph_sha256": onnx_sha256(src), "precision": precision,
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
        save_onnx(load_onnx(entry), out, external_data=use_external_data, restore=False)
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
            save_onnx(load_onnx(entry), out, external_data=use_external_data, restore=False)
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
            bool(external_data_files(src)) or src.stat().st_size > EXTERNAL_DATA_THRESHOLD)
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


# --------------------------------------------------------------------------- accuracy of a Q/DQ graph


def _run_batches(path: Any, input_name: str, batches: np.ndarray) -> dict[str, np.ndarray]:
    """Outputs of ``path`` for each batch, stacked on a new leading axis (ONNX Runtime CPU, basic opts)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    # Extended/all levels fuse Q/DQ into integer kernels (different numbers) and break FP8 Q/DQ graphs.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    runs = [sess.run(names, {input_name: np.ascontiguousarray(b, dtype=np.float32)}) for b in batches]
    return {n: np.stack([r[i] for r in runs]) for i, n in enumerate(names)}


def accuracy_report(
    ref_onnx: Any,
    test_onnx: Any,
    spec: Any,
    calib: Any = None,
    *,
    eval_batches: np.ndarray | None = None,
    num_eval: int = 2,
    seed: int = 20250,
    random_weights: bool = False,
) -> dict[str, Any]:
    """:func:`accuracy_table` of ``test_onnx`` against ``ref_onnx`` (fp32) in ONNX Runtime on the CPU.

    ``spec`` needs ``input_name``, ``input_shape`` ``(S, 3, H, W)``, ``height`` and ``width`` (an
    ``ExportSpec``). Evaluation inputs are ``eval_batches`` ``[n, S, 3, H, W]`` or ``num_eval``
    synthetic batches (seeded by ``seed``); they must differ from every calibration batch in
    ``calib`` (a CalibrationSet or an array), else :class:`InputError`.
    """
    shape = tuple(spec.input_shape)
    if eval_batches is None:
        eval_batches = synthetic_images(num_eval * shape[0], shape[2], shape[3], seed).reshape((num_eval, *shape))
        evaluation = {"kind": "synthetic", "seed": seed, "batches": num_eval}
    else:
        eval_batches = np.asarray(eval_batches, dtype=np.float32).reshape((-1, *shape))
        evaluation = {"kind": "given", "batches": len(eval_batches)}
    if calib is not None:
        digest = lambda a: hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).digest()  # noqa: E731
        arr = calib.load() if hasattr(calib, "load") else np.asarray(calib)
        seen = {digest(v) for v in arr.reshape((-1, *shape[1:]))}
        if any(digest(v) in seen for v in eval_batches.reshape((-1, *shape[1:]))):
            raise InputError("accuracy evaluation images must be distinct from the calibration images")
    ref = _run_batches(ref_onnx, spec.input_name, eval_batches)
    test = _run_batches(test_onnx, spec.input_name, eval_batches)
    table = accuracy_table(ref, test, (spec.height, spec.width), random_weights=random_weights)
    table.update(evaluation=evaluation, runtime="onnxruntime CPU, ORT_ENABLE_BASIC",
                 reference=str(ref_onnx), test=str(test_onnx))
    return table
