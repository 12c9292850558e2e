"""Accuracy of a test run (quantised, fp16, TensorRT ...) against a reference run of the same inputs.

Everything is numpy and every result is JSON-able (non-finite numbers become ``None``). Output
names follow the export: ``pose_enc [1, S, 9]``, ``depth [1, S, H, W, 1]``, ``depth_conf
[1, S, H, W]`` and optionally ``world_points [1, S, H, W, 3]``, ``world_points_conf``.

- ``rel_l2``: ``||test - ref|| / ||ref||`` over the whole tensor; ``max_abs``: largest abs difference.
- depth ``abs_rel``: mean of ``|test - ref| / ref`` over pixels with a positive finite reference.
- ``depth_conf`` ``spearman``: rank correlation of the confidences (which pixels a confidence
  filter keeps), scipy's when installed, else ranks by argsort (ties not averaged).
- camera: geodesic rotation error in degrees between the decoded extrinsics (``2 asin(||R_t -
  R_r||_F / sqrt 8)``, exact also for tiny angles); translation error ``||t_test - t_ref||`` of
  the extrinsics, and relative to the mean reference translation norm (VGGT's first camera is
  the world frame, so per-camera relative errors are undefined there); field-of-view rel error.
- ``world_points_from_depth``: rel L2 of points unprojected from depth with each run's own
  cameras (the pcd-only point cloud); ``world_points``: rel L2 of the point head output.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

__all__ = ["rel_l2", "max_abs", "abs_rel", "spearman", "rotation_error_deg", "camera_errors",
           "accuracy_table", "format_accuracy_table", "accuracy_report"]

RANDOM_WEIGHTS_NOTE = ("weights are random: these numbers measure numeric robustness of the precision "
                       "only, not accuracy on real scenes")


def _pair(ref: Any, test: Any, name: str = "output") -> tuple[np.ndarray, np.ndarray]:
    r, t = np.asarray(ref, dtype=np.float64), np.asarray(test, dtype=np.float64)
    if r.shape != t.shape:
        raise InputError(f"{name}: reference shape {list(r.shape)} differs from test shape {list(t.shape)}")
    return r, t


def _num(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def rel_l2(ref: Any, test: Any) -> float:
    """``||test - ref||_2 / ||ref||_2`` (``inf`` when the reference is all zeros and test differs)."""
    r, t = _pair(ref, test)
    num, den = float(np.linalg.norm(t - r)), float(np.linalg.norm(r))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def max_abs(ref: Any, test: Any) -> float:
    r, t = _pair(ref, test)
    return float(np.max(np.abs(t - r))) if r.size else 0.0


def abs_rel(ref_depth: Any, test_depth: Any, eps: float = 1e-6) -> float:
    """Mean ``|test - ref| / ref`` over pixels whose reference depth is finite and > ``eps``."""
    r, t = _pair(ref_depth, test_depth, "depth")
    valid = np.isfinite(r) & (r > eps)
    if not valid.any():
        raise InputError("depth AbsRel: the reference has no positive finite depth")
    return float(np.mean(np.abs(t[valid] - r[valid]) / r[valid]))


def _ranks(x: np.ndarray) -> np.ndarray:
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[np.argsort(x, kind="stable")] = np.arange(x.size, dtype=np.float64)
    return ranks


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two equally shaped arrays (flattened); NaN if one is constant."""
    x, y = _pair(a, b, "rank correlation")
    x, y = x.ravel(), y.ravel()
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return math.nan
    try:
        from scipy.stats import spearmanr
    except ImportError:
        rx, ry = _ranks(x), _ranks(y)
        return float(np.corrcoef(rx, ry)[0, 1])
    return float(spearmanr(x, y).statistic)


def rotation_error_deg(rot_ref: Any, rot_test: Any) -> np.ndarray:
    """Geodesic angle (degrees) between rotation matrices ``[..., 3, 3]``."""
    r, t = _pair(rot_ref, rot_test, "rotation")
    if r.shape[-2:] != (3, 3):
        raise InputError(f"rotation: expected [..., 3, 3], found {list(r.shape)}")
    chord = np.linalg.norm(t - r, axis=(-2, -1)) / math.sqrt(8.0)
    return np.degrees(2.0 * np.arcsin(np.clip(chord, 0.0, 1.0)))


def camera_errors(ref_pose_enc: Any, test_pose_enc: Any, image_hw: Sequence[int]) -> dict[str, Any]:
    """Rotation (deg), translation (L2 and relative) and field-of-view errors of ``[..., 9]`` encodings."""
    from .recon.geometry import pose_encoding_to_extri_intri

    r, t = _pair(ref_pose_enc, test_pose_enc, "pose_enc")
    ext_r, _ = pose_encoding_to_extri_intri(r, image_hw)
    ext_t, _ = pose_encoding_to_extri_intri(t, image_hw)
    rot = rotation_error_deg(ext_r[..., :3, :3], ext_t[..., :3, :3])
    dt = np.linalg.norm(ext_t[..., :3, 3] - ext_r[..., :3, 3], axis=-1)
    scale = float(np.mean(np.linalg.norm(ext_r[..., :3, 3], axis=-1)))
    fov_rel = np.abs(t[..., 7:9] - r[..., 7:9]) / np.maximum(np.abs(r[..., 7:9]), 1e-12)
    return {"rotation_deg_mean": _num(rot.mean()), "rotation_deg_max": _num(rot.max()),
            "translation_l2_mean": _num(dt.mean()), "translation_l2_max": _num(dt.max()),
            "translation_rel": _num(dt.mean() / scale) if scale > 1e-12 else None,
            "fov_rel_error_mean": _num(fov_rel.mean())}


def _points_from_depth(outputs: Mapping[str, Any], image_hw: Sequence[int]) -> np.ndarray:
    from .recon.geometry import pose_encoding_to_extri_intri, unproject_depth_map_to_point_map

    pose = np.asarray(outputs["pose_enc"], dtype=np.float64)
    ext, intr = pose_encoding_to_extri_intri(pose, image_hw)
    return unproject_depth_map_to_point_map(np.asarray(outputs["depth"], dtype=np.float64), ext, intr)


def accuracy_table(
    ref_outputs: Mapping[str, Any],
    test_outputs: Mapping[str, Any],
    image_hw: Sequence[int] | None = None,
    random_weights: bool = False,
) -> dict[str, Any]:
    """All metrics for the outputs both runs have; JSON-able. ``image_hw`` defaults to depth's H, W."""
    common = [k for k in ref_outputs if k in test_outputs]
    if not common:
        raise InputError(f"no common outputs: reference has {sorted(ref_outputs)}, test has {sorted(test_outputs)}")
    if image_hw is None:
        if "depth" not in ref_outputs:
            raise InputError("image_hw is needed when there is no depth output to read it from")
        shape = np.shape(ref_outputs["depth"])
        image_hw = shape[-3:-1] if shape[-1] == 1 else shape[-2:]
    table: dict[str, Any] = {"image_hw": [int(v) for v in image_hw], "outputs": {}}
    for name in common:
        r, t = _pair(ref_outputs[name], test_outputs[name], name)
        finite = np.isfinite(t)
        table["outputs"][name] = {"rel_l2": _num(rel_l2(r, t)),
                                  "max_abs": _num(max_abs(r, t)) if finite.all() else None,
                                  "nonfinite": int(t.size - finite.sum())}
        if table["outputs"][name]["nonfinite"]:
            log.warning("test output %s has %d non-finite values", name, table["outputs"][name]["nonfinite"])
    if "depth" in common:
        table["depth"] = {"rel_l2": table["outputs"]["depth"]["rel_l2"],
                          "abs_rel": _num(abs_rel(ref_outputs["depth"], test_outputs["depth"]))}
    if "depth_conf" in common:
        table["depth_conf"] = {"spearman": _num(spearman(ref_outputs["depth_conf"], test_outputs["depth_conf"]))}
    if "pose_enc" in common:
        table["camera"] = camera_errors(ref_outputs["pose_enc"], test_outputs["pose_enc"], image_hw)
        if "depth" in common:
            table["world_points_from_depth"] = {"rel_l2": _num(rel_l2(_points_from_depth(ref_outputs, image_hw),
                                                                      _points_from_depth(test_outputs, image_hw)))}
    if "world_points" in common:
        table["world_points"] = {"rel_l2": table["outputs"]["world_points"]["rel_l2"]}
    if random_weights:
        table["note"] = RANDOM_WEIGHTS_NOTE
    return table


_COLUMNS = (("depth relL2", ("depth", "rel_l2")), ("AbsRel", ("depth", "abs_rel")),
            ("conf rho", ("depth_conf", "spearman")), ("rot deg", ("camera", "rotation_deg_mean")),
            ("rot max", ("camera", "rotation_deg_max")), ("trans L2", ("camera", "translation_l2_mean")),
            ("trans rel", ("camera", "translation_rel")), ("pts relL2", ("world_points_from_depth", "rel_l2")),
            ("head pts", ("world_points", "rel_l2")))


def format_accuracy_table(tables: Mapping[str, Any], title: str | None = None) -> str:
    """Text table, one row per label: ``{label: accuracy_table(...)}`` (or one table, labelled "test")."""
    rows = {"test": tables} if "outputs" in tables else dict(tables)
    cols = [c for c in _COLUMNS if any(c[1][0] in t for t in rows.values())]
    width = max([len("precision")] + [len(k) for k in rows])
    head = f"{'precision':<{width}}  " + "  ".join(f"{name:>11}" for name, _ in cols)
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for label, table in rows.items():
        cells = []
        for _, (section, key) in cols:
            value = table.get(section, {}).get(key)
            cells.append(f"{'-':>11}" if value is None else f"{value:>11.4g}")
        lines.append(f"{label:<{width}}  " + "  ".join(cells))
    notes = {t["note"] for t in rows.values() if t.get("note")}
    lines += [f"note: {n}" for n in sorted(notes)]
    return "\n".join(lines)


def _run_onnx(path: Any, input_name: str, batches: np.ndarray) -> dict[str, np.ndarray]:
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
    from .quant.calib import synthetic_images

    shape = tuple(spec.input_shape)
    if eval_batches is None:
        eval_batches = synthetic_images(num_eval * shape[0], shape[2], shape[3], seed).reshape((num_eval, *shape))
        evaluation = {"kind": "synthetic", "seed": seed, "batches": num_eval}
    else:
        eval_batches = np.asarray(eval_batches, dtype=np.float32).reshape((-1, *shape))
        evaluation = {"kind": "given", "batches": len(eval_batches)}
    if calib is not None:
        import hashlib

        digest = lambda a: hashlib.sha1(np.ascontiguousarray(a, dtype=np.float32).tobytes()).digest()  # noqa: E731
        arr = calib.load() if hasattr(calib, "load") else np.asarray(calib)
        seen = {digest(v) for v in arr.reshape((-1, *shape[1:]))}
        if any(digest(v) in seen for v in eval_batches.reshape((-1, *shape[1:]))):
            raise InputError("accuracy evaluation images must be distinct from the calibration images")
    ref = _run_onnx(ref_onnx, spec.input_name, eval_batches)
    test = _run_onnx(test_onnx, spec.input_name, eval_batches)
    table = accuracy_table(ref, test, (spec.height, spec.width), random_weights=random_weights)
    table.update(evaluation=evaluation, runtime="onnxruntime CPU, ORT_ENABLE_BASIC",
                 reference=str(ref_onnx), test=str(test_onnx))
    return table
