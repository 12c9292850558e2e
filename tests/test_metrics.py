"""Accuracy metrics: known answers for each metric, the table, and its JSON/text forms."""

from __future__ import annotations

import builtins
import json
import math

import numpy as np
import pytest

from vggt_trt import accuracy as m
from vggt_trt.errors import InputError
from vggt_trt.recon.geometry import extri_intri_to_pose_encoding

S, H, W = 3, 14, 28


def _rot_z(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1.0]])


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    return np.array([[1.0, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def _pose_enc(rots, trans, focal=20.0) -> np.ndarray:
    ext = np.stack([np.concatenate([r, np.asarray(t, float)[:, None]], 1) for r, t in zip(rots, trans)])
    intr = np.tile(np.array([[focal, 0, W / 2], [0, focal, H / 2], [0, 0, 1.0]]), (len(rots), 1, 1))
    return extri_intri_to_pose_encoding(ext, intr, (H, W))[None]


def _outputs(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "pose_enc": _pose_enc([np.eye(3), _rot_z(20), _rot_x(-15)], [[0, 0, 0], [1.0, 0, 0], [0, 0.5, 0.2]]),
        "depth": rng.uniform(1, 5, (1, S, H, W, 1)),
        "depth_conf": rng.uniform(1, 10, (1, S, H, W)),
    }


def test_rel_l2_and_max_abs():
    ref = np.array([3.0, 4.0])
    assert m.rel_l2(ref, ref) == 0.0
    assert m.rel_l2(ref, [3.0, 4.5]) == pytest.approx(0.1)
    assert m.max_abs(ref, [2.0, 4.5]) == 1.0
    assert m.rel_l2([0.0], [0.0]) == 0.0 and m.rel_l2([0.0], [1.0]) == math.inf
    with pytest.raises(InputError, match=r"reference shape \[2\] differs from test shape \[3\]"):
        m.rel_l2(ref, [1.0, 2.0, 3.0])


def test_abs_rel_ignores_invalid_reference_pixels():
    ref = np.array([1.0, 2.0, 0.0, np.nan])
    test = np.array([1.1, 1.8, 5.0, 1.0])
    assert m.abs_rel(ref, test) == pytest.approx((0.1 + 0.1) / 2)
    with pytest.raises(InputError, match="no positive"):
        m.abs_rel([0.0, -1.0], [1.0, 1.0])


def test_spearman_scipy_and_fallback_agree(monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.normal(size=500)
    assert m.spearman(a, np.exp(a)) == pytest.approx(1.0)  # any monotone map keeps the ranks
    assert m.spearman(a, -a) == pytest.approx(-1.0)
    noisy = a + rng.normal(scale=0.5, size=a.size)
    with_scipy = m.spearman(a, noisy)
    assert 0.5 < with_scipy < 0.99
    real_import = builtins.__import__

    def no_scipy(name, *args, **kwargs):
        if name.startswith("scipy"):
            raise ImportError("scipy hidden by the test")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scipy)
    assert m.spearman(a, noisy) == pytest.approx(with_scipy, abs=1e-9)
    assert math.isnan(m.spearman(np.ones(5), a[:5]))


def test_rotation_error_is_geodesic_and_exact_for_small_angles():
    assert m.rotation_error_deg(np.eye(3), _rot_z(10)) == pytest.approx(10.0)
    assert m.rotation_error_deg(_rot_x(30), _rot_x(30) @ _rot_z(1e-4)) == pytest.approx(1e-4, rel=1e-5)
    batch = m.rotation_error_deg(np.stack([np.eye(3)] * 2), np.stack([_rot_x(5), _rot_z(170)]))
    np.testing.assert_allclose(batch, [5.0, 170.0])


def test_camera_errors_known_answers():
    ref = _outputs()["pose_enc"]
    test = _pose_enc([np.eye(3), _rot_z(20) @ _rot_x(2), _rot_x(-15)], [[0, 0, 0], [1.0, 0, 0.3], [0, 0.5, 0.2]])
    err = m.camera_errors(ref, test, (H, W))
    assert err["rotation_deg_max"] == pytest.approx(2.0, abs=1e-6)
    assert err["rotation_deg_mean"] == pytest.approx(2.0 / 3, abs=1e-6)
    assert err["translation_l2_max"] == pytest.approx(0.3) and err["translation_l2_mean"] == pytest.approx(0.1)
    scale = (0 + 1.0 + math.hypot(0.5, 0.2)) / 3
    assert err["translation_rel"] == pytest.approx(0.1 / scale)
    assert err["fov_rel_error_mean"] == pytest.approx(0.0, abs=1e-12)


def test_accuracy_table_identical_runs():
    out = _outputs()
    table = m.accuracy_table(out, {k: v.copy() for k, v in out.items()}, (H, W))
    json.dumps(table, allow_nan=False)
    assert table["depth"] == {"rel_l2": 0.0, "abs_rel": 0.0}
    assert table["depth_conf"]["spearman"] == pytest.approx(1.0)
    assert table["camera"]["rotation_deg_max"] == pytest.approx(0.0, abs=1e-6)
    assert table["world_points_from_depth"]["rel_l2"] == 0.0
    assert "world_points" not in table and "note" not in table  # pcd-only outputs, real weights


def test_accuracy_table_measures_depth_and_points():
    ref = _outputs()
    ref["pose_enc"] = _pose_enc([np.eye(3)] * S, [[0, 0, 0]] * S)  # every camera at the world origin
    ref["world_points"] = np.ones((1, S, H, W, 3))
    test = {**ref, "depth": ref["depth"] * 1.01, "world_points": ref["world_points"] * 1.02}
    table = m.accuracy_table(ref, test, random_weights=True)  # image_hw read from depth
    assert table["image_hw"] == [H, W]
    assert table["depth"]["rel_l2"] == pytest.approx(0.01) and table["depth"]["abs_rel"] == pytest.approx(0.01)
    assert table["world_points_from_depth"]["rel_l2"] == pytest.approx(0.01)
    assert table["world_points"]["rel_l2"] == pytest.approx(0.02)
    assert "random" in table["note"]


def test_nonfinite_test_outputs_become_none():
    ref = _outputs()
    test = {k: v.copy() for k, v in ref.items()}
    test["depth"][0, 0, 0, 0, 0] = np.nan
    table = m.accuracy_table(ref, test, (H, W))
    json.dumps(table, allow_nan=False)
    assert table["outputs"]["depth"] == {"rel_l2": None, "max_abs": None, "nonfinite": 1}


def test_table_errors():
    with pytest.raises(InputError, match="no common outputs"):
        m.accuracy_table({"depth": np.ones(2)}, {"pose_enc": np.ones(9)}, (H, W))
    ref = _outputs()
    with pytest.raises(InputError, match="depth_conf: reference shape"):
        m.accuracy_table(ref, {**ref, "depth_conf": ref["depth_conf"][:, :1]}, (H, W))


def test_format_accuracy_table():
    ref = _outputs()
    tables = {"fp16": m.accuracy_table(ref, ref, (H, W)),
              "int8": m.accuracy_table(ref, {**ref, "depth": ref["depth"] * 1.05}, (H, W), random_weights=True)}
    text = m.format_accuracy_table(tables, title="toy")
    lines = text.splitlines()
    assert lines[0] == "toy" and "depth relL2" in lines[1] and "pts relL2" in lines[1]
    assert lines[3].startswith("fp16") and lines[4].startswith("int8") and "0.05" in lines[4]
    assert "head pts" not in text  # no column for an output neither run has
    assert lines[-1].startswith("note: weights are random")
    assert m.format_accuracy_table(tables["fp16"]).splitlines()[2].startswith("test")
