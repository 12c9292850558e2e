"""CPU runs of ONNX graphs (ONNX Runtime or the onnx reference evaluator) for numeric comparisons between graphs."""

from __future__ import annotations

import logging
import os
from typing import Any, Mapping, Sequence

import numpy as np

from ..accuracy import tensor_errors
from ..errors import AccuracyError, GraphError, InputError
from .io import check_file, load_onnx

logger = logging.getLogger(__name__)


def ort_errors() -> tuple[type[BaseException], ...]:
    """ONNX Runtime's exception classes (they share no base class beyond RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError,)


def reference_gap_ops(model: Any) -> list[type]:
    """Kernels the onnx reference evaluator lacks for this graph's opset: DequantizeLinear before opset 19
    (onnx 1.23 has 19 and later only; later versions only add input types and attributes, whose defaults keep
    the opset-13 meaning)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None or opset >= 19:
        return []
    from onnx.reference.ops.op_dequantize_linear import DequantizeLinear_25

    return [type("DequantizeLinear", (DequantizeLinear_25,), {"op_domain": ""})]


def run_onnx(path: str | os.PathLike, feeds: Mapping[str, np.ndarray], output_names: Sequence[str] | None = None,
             *, backend: str = "ort", opt_level: str = "basic") -> dict[str, np.ndarray]:
    """Run a graph on CPU with ONNX Runtime (``backend="ort"``) or the onnx reference evaluator ("reference")."""
    p = check_file(path)
    if backend == "reference":  # pure numpy; slow, but runs bfloat16 graphs that ORT CPU cannot
        from onnx.reference import ReferenceEvaluator

        model = load_onnx(p)
        names = list(output_names or [o.name for o in model.graph.output])
        return dict(zip(names, ReferenceEvaluator(model, new_ops=reference_gap_ops(model)).run(names, dict(feeds))))
    if backend != "ort":
        raise InputError(f"unknown backend {backend!r}; use 'ort' or 'reference'")
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    levels = {"disable": level.ORT_DISABLE_ALL, "basic": level.ORT_ENABLE_BASIC,
              "extended": level.ORT_ENABLE_EXTENDED, "all": level.ORT_ENABLE_ALL}
    if opt_level not in levels:
        raise InputError(f"unknown ORT optimisation level {opt_level!r}; use one of {sorted(levels)}")
    so = ort.SessionOptions()
    so.graph_optimization_level = levels[opt_level]
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        if wanted != set(feeds):
            raise InputError(f"{p.name} takes inputs {sorted(wanted)}; got {sorted(feeds)}")
        names = list(output_names or [o.name for o in sess.get_outputs()])
        return dict(zip(names, sess.run(names, dict(feeds))))
    except ort_errors() as exc:
        raise GraphError(f"ONNX Runtime cannot run {p.name}: {exc}") from exc


def compare_onnx_ort(ref_path: str | os.PathLike, test_path: str | os.PathLike, feeds: Mapping[str, np.ndarray],
                     output_names: Sequence[str] | None = None, *, backend: str = "ort",
                     opt_level: str = "basic") -> dict[str, dict[str, Any]]:
    """Per-output :func:`vggt_trt.accuracy.tensor_errors` of ``test_path`` against ``ref_path``.

    ORT's default level fuses Q/DQ into integer kernels and inflates errors, so the default is
    ORT_ENABLE_BASIC (shared/notes/quantisation-stack.md). ``backend="reference"`` runs bfloat16 graphs.
    """
    ref = run_onnx(ref_path, feeds, output_names, backend=backend, opt_level=opt_level)
    test = run_onnx(test_path, feeds, list(ref), backend=backend, opt_level=opt_level)
    results: dict[str, dict[str, Any]] = {}
    for name, r in ref.items():
        entry = tensor_errors(r, test[name])
        results[name] = entry
        logger.info("compare %s: rel_l2 %.3g, max_abs %.3g (|ref| max %.3g)", name, entry["rel_l2"],
                    entry["max_abs"], entry["ref_max_abs"])
    return results


def assert_accuracy(results: Mapping[str, Mapping[str, Any]], max_rel_l2: float = 1e-2,
                    per_output: Mapping[str, float] | None = None) -> None:
    """Raise AccuracyError listing every output whose rel_l2 exceeds its tolerance (or is not finite)."""
    bad = []
    for name, entry in results.items():
        tol = (per_output or {}).get(name, max_rel_l2)
        err = float(entry["rel_l2"])
        if not np.isfinite(err) or err > tol or entry.get("nonfinite", 0):
            bad.append(f"{name}: rel_l2 {err:.4g} > {tol:g} (max_abs {float(entry['max_abs']):.4g}, "
                       f"non-finite {entry.get('nonfinite', 0)})")
    if bad:
        raise AccuracyError(f"{len(bad)} of {len(results)} outputs over tolerance: " + "; ".join(bad))
