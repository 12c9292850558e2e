"""Geometry round trips as properties (hypothesis), and every confidence cut with a value exactly on it.

Tolerances are stated here, never read from the code under test: float64 round trips agree to 1e-9
(absolute, on unit-scale values; measured worst 4e-13), float32 torch paths to 1e-4.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from vggt_trt.errors import InputError
from vggt_trt.recon import geometry as g

PROPS = settings(max_examples=int(os.environ.get("VGGT_TRT_PROPERTY_EXAMPLES", "40")), deadline=None)
ATOL64 = 1e-9

unit = st.floats(-1.0, 1.0, allow_nan=False)
quats = st.tuples(unit, unit, unit, st.floats(0.05, 1.0)).filter(lambda q: np.linalg.norm(q) > 0.2)
translations = st.tuples(*[st.floats(-5.0, 5.0)] * 3)
fovs = st.floats(0.2, 2.6)
sizes = st.tuples(st.integers(1, 40), st.integers(1, 40)).map(lambda hw: (14 * hw[0], 14 * hw[1]))
scales = st.floats(0.05, 20.0)


def rotation(q) -> np.ndarray:
    q = np.asarray(q, np.float64)
    return g.quat_to_mat(q / np.linalg.norm(q))


def extrinsic(q, t) -> np.ndarray:
    return np.concatenate([rotation(q), np.asarray(t, np.float64)[:, None]], 1)


# ----------------------------------------------------------------------------- round trips


@PROPS
@given(q=quats, t=translations, fov_h=fovs, fov_w=fovs, hw=sizes)
def test_pose_encoding_roundtrip_property(q, t, fov_h, fov_w, hw):
    qn = np.asarray(q) / np.linalg.norm(q)
    enc = np.concatenate([t, qn, [fov_h, fov_w]])
    extr, intr = g.pose_encoding_to_extri_intri(enc, hw)
    h, w = hw
    # the intrinsics: fx = (W/2) / tan(fov_w/2), principal point at the image centre
    np.testing.assert_allclose(intr, [[w / 2 / np.tan(fov_w / 2), 0, w / 2], [0, h / 2 / np.tan(fov_h / 2), h / 2],
                                      [0, 0, 1]], rtol=1e-12)
    np.testing.assert_allclose(extr[:, 3], t, atol=0)
    np.testing.assert_allclose(g.extri_intri_to_pose_encoding(extr, intr, hw), enc, atol=ATOL64)
    back_e, back_k = g.pose_encoding_to_extri_intri(g.extri_intri_to_pose_encoding(extr, intr, hw), hw)
    np.testing.assert_allclose(back_e, extr, atol=ATOL64)
    np.testing.assert_allclose(back_k, intr, rtol=1e-9)
    torch_e, torch_k = g.pose_encoding_to_extri_intri(torch.from_numpy(enc), hw)
    np.testing.assert_allclose(torch_e.numpy(), extr, atol=ATOL64)
    np.testing.assert_allclose(torch_k.numpy(), intr, rtol=1e-12)


@PROPS
@given(q=quats)
def test_rotation_matrix_to_quaternion_property(q):
    qn = np.asarray(q) / np.linalg.norm(q)
    rot = g.quat_to_mat(qn)
    np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=ATOL64)
    assert np.linalg.det(rot) == pytest.approx(1.0, abs=ATOL64)
    np.testing.assert_allclose(g.mat_to_quat(rot), qn, atol=ATOL64)
    np.testing.assert_allclose(g.mat_to_quat(torch.from_numpy(rot)).numpy(), qn, atol=ATOL64)
    # the rotation of a known vector, written out: q v q* for v = x axis
    x, y, z, w = qn
    np.testing.assert_allclose(rot[:, 0], [1 - 2 * (y * y + z * z), 2 * (x * y + z * w), 2 * (x * z - y * w)],
                               atol=ATOL64)


@PROPS
@given(q=quats, t=translations, fov_h=fovs, fov_w=fovs, data=st.data(), offset=st.sampled_from([0.0, 0.5]))
def test_unproject_then_project_is_the_pixel_grid(q, t, fov_h, fov_w, data, offset):
    h, w = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 9))
    depth = data.draw(arrays(np.float64, (h, w), elements=st.floats(0.1, 50.0)))
    enc = np.concatenate([t, np.asarray(q) / np.linalg.norm(q), [fov_h, fov_w]])
    extr, intr = g.pose_encoding_to_extri_intri(enc, (14, 28))  # intrinsics of another size: cx != W/2 here
    pts = g.unproject_depth_map_to_point_map(depth[None], extr[None], intr[None], pixel_offset=offset)[0]
    cam = pts @ extr[:, :3].T + extr[:, 3]
    np.testing.assert_allclose(cam[..., 2], depth, rtol=1e-9)
    u = intr[0, 0] * cam[..., 0] / cam[..., 2] + intr[0, 2]
    v = intr[1, 1] * cam[..., 1] / cam[..., 2] + intr[1, 2]
    grid_v, grid_u = np.mgrid[0:h, 0:w]
    np.testing.assert_allclose(u, grid_u + offset, atol=1e-7)
    np.testing.assert_allclose(v, grid_v + offset, atol=1e-7)
    as_torch = g.unproject_depth_map_to_point_map(torch.from_numpy(depth)[None], torch.from_numpy(extr)[None],
                                                  torch.from_numpy(intr)[None], pixel_offset=offset)[0]
    np.testing.assert_allclose(as_torch.numpy(), pts, rtol=1e-12, atol=1e-12)


@PROPS
@given(q=quats, t=translations, scale=scales, data=st.data())
def test_similarity_alignment_recovers_a_known_transform(q, t, scale, data):
    n = data.draw(st.integers(3, 12))
    src = data.draw(arrays(np.float64, (n, 3), elements=st.floats(-10.0, 10.0)))
    centred = src - src.mean(0)
    sv = np.linalg.svd(centred, compute_uv=False)
    assume(sv[1] > 0.5 and sv[2] > 0.05 * sv[0])  # well spread: the rotation is determined
    rot, t = rotation(q), np.asarray(t)
    dst = scale * src @ rot.T + t
    fit = g.umeyama_similarity(src, dst)
    assert fit.scale == pytest.approx(scale, rel=1e-8)
    np.testing.assert_allclose(fit.R, rot, atol=1e-7)
    np.testing.assert_allclose(fit.t, t, atol=1e-6 * (1 + scale * 10))
    assert fit.rms < 1e-6 * (1 + scale)
    np.testing.assert_allclose(g.apply_similarity(src, fit.scale, fit.R, fit.t), dst, atol=1e-6 * (1 + scale))
    fixed = g.umeyama_similarity(src, src @ rot.T + t, with_scale=False)
    assert fixed.scale == 1.0 and fixed.rms < 1e-6
    # cameras moved by the same transform see every moved point at scale x its old camera coordinates
    extr = extrinsic(q[::-1], t[::-1])
    moved = g.similarity_transform_extrinsics(extr, fit.scale, fit.R, fit.t)
    np.testing.assert_allclose(g.camera_centers(moved), g.apply_similarity(g.camera_centers(extr), scale, rot, t),
                               atol=1e-6 * (1 + scale * 10))
    cam_old = src @ extr[:, :3].T + extr[:, 3]
    cam_new = dst @ moved[:, :3].T + moved[:, 3]
    np.testing.assert_allclose(cam_new, scale * cam_old, atol=1e-6 * (1 + scale * 10))


@PROPS
@given(q=quats, t=translations)
def test_inverse_se3_and_centres_property(q, t):
    extr = extrinsic(q, t)
    inv = g.closed_form_inverse_se3(extr)
    full = np.vstack([extr, [0, 0, 0, 1.0]])
    np.testing.assert_allclose(inv @ full, np.eye(4), atol=ATOL64)
    np.testing.assert_allclose(inv[3], [0, 0, 0, 1.0], atol=0)
    np.testing.assert_allclose(g.camera_centers(extr), inv[:3, 3], atol=ATOL64)
    np.testing.assert_allclose(g.camera_centers(torch.from_numpy(full)).numpy(), inv[:3, 3], atol=ATOL64)


# ----------------------------------------------------------------------------- confidence cuts


def _both(conf: np.ndarray, **kwargs) -> list[np.ndarray]:
    """The mask from the numpy path and from the torch path."""
    return [np.asarray(g.confidence_mask(conf, **kwargs)),
            g.confidence_mask(torch.from_numpy(conf), **kwargs).numpy()]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confidence_threshold_keeps_a_value_exactly_on_the_cut(dtype):
    conf = np.array([[1.0, 2.0, 3.0], [2.0, 5.0, 1.5]], dtype)
    for mask in _both(conf, threshold=2.0):
        np.testing.assert_array_equal(mask, [[False, True, True], [True, True, False]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_confidence_percentile_keeps_a_value_exactly_on_the_cut(dtype):
    # 5 values: the 25th percentile is the 2nd smallest exactly (position 1.0); 75th: position 3.0
    conf = np.array([4.0, 2.0, 5.0, 1.0, 3.0], dtype)
    for mask in _both(conf, percentile=25):
        np.testing.assert_array_equal(mask, [True, True, True, False, True])
    for mask in _both(conf, percentile=75):
        np.testing.assert_array_equal(mask, [True, False, True, False, False])
    # between two order statistics: 1 + 0.4 * (2 - 1) = 1.4 at 10 %; 2 is kept, 1 is not
    for mask in _both(conf, percentile=10):
        np.testing.assert_array_equal(mask, [True, True, True, False, True])
    # just under the last value: position 3.96, cut at 4.96
    for mask in _both(conf, percentile=99):
        np.testing.assert_array_equal(mask, [False, False, True, False, False])


def test_confidence_eps_is_exclusive_and_non_finite_values_are_ignored_by_the_percentile():
    conf = np.array([1e-5, 2e-5, 0.0, -1.0, 3.0])
    for mask in _both(conf):
        np.testing.assert_array_equal(mask, [False, True, False, False, True])
    for mask in _both(conf, eps=2e-5):
        np.testing.assert_array_equal(mask, [False, False, False, False, True])
    # the percentile is over finite values only: 1, 2, 3, 4 -> 50 % = 2.5
    conf = np.array([1.0, np.nan, 2.0, np.inf, 3.0, 4.0, -np.inf])
    for mask in _both(conf, percentile=50):
        np.testing.assert_array_equal(mask, [False, False, False, False, True, True, False])
    for mask in _both(conf, percentile=50, threshold=4.0):
        np.testing.assert_array_equal(mask, [False, False, False, False, False, True, False])


def test_confidence_percentile_bounds():
    conf = np.arange(1.0, 11.0)
    for mask in _both(conf, percentile=0):  # 0 drops nothing
        assert mask.all()
    for mask in _both(conf, percentile=99.99):
        np.testing.assert_array_equal(np.flatnonzero(mask), [9])
    for bad in (100, 100.5):
        with pytest.raises(InputError, match=r"\[0, 100\)"):
            g.confidence_mask(conf, percentile=bad)
    with pytest.raises(InputError, match="finite"):
        g.confidence_mask(conf, threshold=float("nan"))
    for mask in _both(np.full(3, np.nan), percentile=50):  # nothing finite: nothing kept, no error
        assert not mask.any()


@PROPS
@given(conf=arrays(np.float32, st.integers(1, 60), elements=st.floats(0.0, 8.0, width=32)),
       percentile=st.floats(0.0, 99.9))
def test_confidence_torch_percentile_matches_numpy(conf, percentile):
    ref, ours = _both(conf, percentile=percentile)
    cut = np.percentile(conf.astype(np.float64), percentile)
    # the two paths interpolate in float32 and float64: only values within 1 ulp of the cut may differ
    near = np.abs(conf - cut) <= 4 * np.spacing(np.float32(max(abs(cut), 1e-30)))
    np.testing.assert_array_equal(ref[~near], ours[~near])
    np.testing.assert_array_equal(ref[~near], ((conf >= cut) & (conf > 1e-5))[~near])


def test_explicit_dtype_and_named_shape_errors():
    extr = np.concatenate([np.eye(3), [[0.0], [0.0], [1.0]]], 1)[None]
    intr = np.array([[[2.0, 0, 1], [0, 2.0, 1], [0, 0, 1]]])
    out = g.unproject_depth_map_to_point_map(np.ones((1, 2, 2)), extr, intr, dtype=np.float32)
    assert out.dtype == np.float32  # every input is cast, not only the depth
    np.testing.assert_array_equal(out[0, 1, 1], [0.0, 0.0, 0.0])  # pixel (1, 1) is the principal point at depth 1
    with pytest.raises(InputError, match=r"extrinsic: expected shape \[\.\.\., 3x4\]"):
        g.similarity_transform_extrinsics(np.zeros((2, 3, 3)), 1.0, np.eye(3), np.zeros(3))
