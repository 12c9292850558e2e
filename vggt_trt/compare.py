"""Accuracy of one backend's VGGT outputs against another's: raw tensor errors, pose and depth metrics.

Results are plain JSON-able dicts (Polygraphy's "comparisons are data"); printing is the CLI's job.
The metric definitions are :mod:`vggt_trt.accuracy`' (shared with the quantisation reports); this module adds
per-camera detail and includes that module's ``accuracy_table`` under ``accuracy``.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

logger = logging.getLogger(__name__)


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


def rotation_error_deg(rot_ref: np.ndarray, rot_test: np.ndarray) -> np.ndarray:
    """Geodesic angle (degrees) between rotation matrices ``[..., 3, 3]`` (:func:`vggt_trt.accuracy.rotation_error_deg`)."""
    from .accuracy import rotation_error_deg as _rot

    return _rot(rot_ref, rot_test)


def pose_metrics(pose_ref: np.ndarray, pose_test: np.ndarray, image_hw: Sequence[int]) -> dict[str, Any]:
    """Per-camera rotation error (deg), translation error (in VGGT's normalised units), FoV error (deg)."""
    from .recon.geometry import pose_encoding_to_extri_intri

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
    from .accuracy import abs_rel

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
        from .accuracy import accuracy_table

        result["accuracy"] = accuracy_table(ref, test, image_hw)
    for name, e in result["outputs"].items():
        logger.info("compare %s: rel_l2 %.3g, max_abs %.3g (|ref| max %.3g)", name, e["rel_l2"], e["max_abs"],
                    e["ref_max_abs"])
    return result
