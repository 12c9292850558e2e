"""Pre-export quantisation modes (``--quant-mode``) whose quantised weights reach the ONNX graph.

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
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from ..errors import GraphError, InputError, MissingDependencyError
from ..graph.io import constant_tensors, consumers, load_onnx, save_onnx
from .ptq import qdq_summary

if TYPE_CHECKING:  # pragma: no cover
    import onnx
    import torch

    from .calib import CalibrationSet

log = logging.getLogger(__name__)

QUANT_MODES = ("none", "torch-int8-dynamic", "bitsandbytes-8bit", "bitsandbytes-nf4", "bitsandbytes-fp4",
               "modelopt-fp8")
ACTIVATION_QUANT_MODES = ("modelopt-fp8",)  # their graphs already carry activation Q/DQ: no ONNX PTQ on top


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
    consts = constant_tensors(model)
    inits = {t.name: t for t in graph.initializer}
    users = consumers(graph)
    folded, dead = 0, set()
    for node in list(graph.node):
        q = inits.get(node.input[0]) if node.op_type == "DequantizeLinear" else None
        if q is None or q.data_type != TensorProto.INT8:
            continue
        if len(q.dims) != 3 or len(users.get(node.output[0], [])) != 1:
            continue
        scale_ok = float(numpy_helper.to_array(consts[node.input[1]])) == 1.0 if node.input[1] in consts else False
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        mul = users[node.output[0]][0]
        if not scale_ok or (zp is not None and np.any(numpy_helper.to_array(zp))) or mul.op_type != "Mul":
            continue
        s_name = mul.input[1] if mul.input[0] == node.output[0] else mul.input[0]
        nxt = users.get(mul.output[0], [])
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
    proto = load_onnx(src)
    fold = fold_weight_dequant_to_dq(proto) if report.get("mode", "none") != "none" else {}
    summary = qdq_summary(proto)
    expected = int(report.get("quantized_layers", 0))
    if report.get("mode", "none") != "none" and summary["quantized_weight_count"] < expected:
        raise GraphError(
            f"quant mode {report['mode']}: {expected} layers were quantised in torch but the graph {src} holds "
            f"{summary['quantized_weight_count']} quantised weights ({summary['quantized_weights']}); refusing to "
            "label float weights as quantised")
    dst = save_onnx(proto, Path(out_path) if out_path else src, restore=False)
    log.info("quant mode %s graph %s: %d Q / %d DQ, quantised weights %s, weights %.1f MB (%.1f MB as fp32)",
             report.get("mode"), dst, summary["quantize_linear"], summary["dequantize_linear"],
             summary["quantized_weights"], summary["weight_bytes"] / 1e6, summary["weight_bytes_if_fp32"] / 1e6)
    return {**report, "graph": summary, "fold": fold, "onnx": str(dst)}
