"""Accuracy of a test run (quantised, fp16, TensorRT ...) against a reference run of the same inputs.

One vocabulary for every comparison in the toolkit: raw tensor errors (:func:`tensor_errors`, used by the
graph checks, the fixture checker and the benchmarks), the metric table of the quantisation reports
(:func:`accuracy_table`) and the per-camera detail of ``trt_inference.py --compare`` (:func:`compare_outputs`).

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
from .recon.geometry import pose_encoding_to_extri_intri, unproject_depth_map_to_point_map

logger = logging.getLogger(__name__)

__all__ = ["rel_l2", "max_abs", "abs_rel", "spearman", "rotation_error_deg", "camera_errors",
           "accuracy_table", "format_accuracy_table", "tensor_errors", "pose_metrics", "depth_metrics",
           "compare_outputs"]

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


def tensor_errors(ref: np.ndarray, test: np.ndarray) -> dict[str, Any]:
    """Relative L2 (``|test-ref| / |ref|``), max/mean abs error and the count of non-finite test values."""
    r64, t64 = np.asarray(ref, dtype=np.float64), np.asarray(test, dtype=np.float64)
    entry: dict[str, Any] = {"shape": list(r64.shape), "ref_max_abs": float(np.max(np.abs(r64), initial=0.0))}
    if r64.shape != t64.shape:
        return {**entry, "test_shape": list(t64.shape), "rel_l2": float("inf"), "max_abs": float("inf"),
                "mean_abs": float("inf"), "nonfinite": -1}
    diff = t64 - r64
    entry["rel_l2"] = float(np.linalg.norm(diff) / max(float(np.linalg.norm(r64)), 1e-30))
    entry["max_abs"] = float(np.max(np.abs(diff), initial=0.0))
    entry["mean_abs"] = float(np.mean(np.abs(diff))) if diff.size else 0.0
    entry["nonfinite"] = int(t64.size - np.count_nonzero(np.isfinite(t64)))
    return entry


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
            logger.warning("test output %s has %d non-finite values", name, table["outputs"][name]["nonfinite"])
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


# ------------------------------------------------- per-camera detail for trt_inference.py --compare
def pose_metrics(pose_ref: np.ndarray, pose_test: np.ndarray, image_hw: Sequence[int]) -> dict[str, Any]:
    """Per-camera rotation error (deg), translation error (in VGGT's normalised units), FoV error (deg)."""
    ref = np.asarray(pose_ref, np.float64).reshape(-1, 9)
    test = np.asarray(pose_test, np.float64).reshape(-1, 9)
    if ref.shape != test.shape:
        raise InputError(f"pose encodings differ in shape: {list(ref.shape)} vs {list(test.shape)}")
    ext_r, _ = pose_encoding_to_extri_intri(ref, image_hw, build_intrinsics=False)
    ext_t, _ = pose_encoding_to_extri_intri(test, image_hw, build_intrinsics=False)
    rot = rotation_error_deg(ext_r[:, :3, :3], ext_t[:, :3, :3])
    trans = np.linalg.norm(ext_r[:, :, 3] - ext_t[:, :, 3], axis=-1)
    scale = max(float(np.linalg.norm(ext_r[:, :, 3], axis=-1).mean()), 1e-12)
    fov = np.degrees(np.abs(ref[:, 7:9] - test[:, 7:9])).max(-1)
    return {"rotation_error_deg": {"mean": float(rot.mean()), "max": float(rot.max()), "per_camera": rot.tolist()},
            "translation_error": {"mean": float(trans.mean()), "max": float(trans.max()),
                                  "relative_mean": float(trans.mean() / scale), "per_camera": trans.tolist()},
            "fov_error_deg": {"mean": float(fov.mean()), "max": float(fov.max())}}


def depth_metrics(depth_ref: np.ndarray, depth_test: np.ndarray, eps: float = 1e-6) -> dict[str, Any]:
    """AbsRel, RMSE and the share of pixels with ``max(t/r, r/t) < 1.25`` over pixels with finite ``ref > eps``."""
    r = np.asarray(depth_ref, np.float64).reshape(-1)
    t = np.asarray(depth_test, np.float64).reshape(-1)
    if r.shape != t.shape:
        raise InputError(f"depth maps differ in size: {r.size} vs {t.size}")
    valid = np.isfinite(r) & (r > eps) & np.isfinite(t)
    if not valid.any():
        return {"abs_rel": float("nan"), "rmse": float("nan"), "delta_1.25": float("nan"), "valid_pixels": 0}
    absrel = abs_rel(r, t, eps)
    r, t = r[valid], t[valid]
    ratio = np.maximum(t / r, r / np.maximum(t, eps))
    return {"abs_rel": float(absrel), "rmse": float(np.sqrt(np.mean((t - r) ** 2))),
            "delta_1.25": float(np.mean(ratio < 1.25)), "valid_pixels": int(valid.sum())}


def compare_outputs(ref: Mapping[str, np.ndarray], test: Mapping[str, np.ndarray],
                    image_hw: Sequence[int] | None = None) -> dict[str, Any]:
    """Errors of every output both sides have, plus pose metrics (``pose_enc``) and depth metrics (``depth``)."""
    common = [k for k in ref if k in test]
    if not common:
        raise InputError(f"no common outputs to compare: reference {sorted(ref)}, test {sorted(test)}")
    result: dict[str, Any] = {"outputs": {k: tensor_errors(ref[k], test[k]) for k in common},
                              "only_in_reference": sorted(set(ref) - set(test)),
                              "only_in_test": sorted(set(test) - set(ref))}
    if "pose_enc" in common and image_hw is not None:
        result["pose"] = pose_metrics(ref["pose_enc"], test["pose_enc"], image_hw)
    if "depth" in common and np.shape(ref["depth"]) == np.shape(test["depth"]):
        result["depth"] = depth_metrics(ref["depth"], test["depth"])
    if image_hw is not None:
        result["accuracy"] = accuracy_table(ref, test, image_hw)
    for name, e in result["outputs"].items():
        logger.info("compare %s: rel_l2 %.3g, max_abs %.3g (|ref| max %.3g)", name, e["rel_l2"], e["max_abs"],
                    e["ref_max_abs"])
    return result
