"""Geometry against the official-code fixture (numpy and torch) and against independent identities."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch

from vggt_trt.recon import geometry as g
from vggt_trt.errors import InputError

# Tolerances against the float32 reference (measured: extrinsic exact, intrinsic 3.8e-6 max abs
# (one float32 ulp at ~46) in numpy and exact in torch, world points 2.5e-8 relative / 2.8e-7 max abs).
TOL = {
    "extrinsic": (1e-6, 1e-6),
    "intrinsic": (1e-6, 1e-5),
    "world_points": (1e-6, 2e-6),
}


def rel_l2(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def max_abs(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def assert_close(name, ours, ref):
    rel_tol, abs_tol = TOL[name]
    r, m = rel_l2(ours, ref), max_abs(ours, ref)
    assert r <= rel_tol and m <= abs_tol, f"{name}: rel L2 {r:.3g} (tol {rel_tol}), max abs {m:.3g} (tol {abs_tol})"


@pytest.fixture(scope="module")
def fx(fixtures_dir):
    from safetensors.numpy import load_file

    wanted = ("outputs.pose_enc", "outputs.depth", "outputs.depth_conf", "post.")
    data = load_file(str(fixtures_dir / "vggt-tiny-a.safetensors"))
    return {k: v for k, v in data.items() if k.startswith(wanted)}


def random_quats(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 4))


def random_rotations(n, seed=0):
    q = random_quats(n, seed)
    return g.quat_to_mat(q / np.linalg.norm(q, axis=-1, keepdims=True))


# ----------------------------------------------------------------------------- fixture


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_pose_decoding_matches_fixture(fx, backend):
    pose_enc = fx["outputs.pose_enc"]
    hw = fx["outputs.depth"].shape[2:4]
    if backend == "torch":
        pose_enc = torch.from_numpy(pose_enc)
    extrinsic, intrinsic = g.pose_encoding_to_extri_intri(pose_enc, hw)
    assert type(extrinsic) is type(pose_enc) and type(intrinsic) is type(pose_enc)
    assert tuple(extrinsic.shape) == (1, 2, 3, 4) and tuple(intrinsic.shape) == (1, 2, 3, 3)
    assert str(extrinsic.dtype).endswith("float32") and str(intrinsic.dtype).endswith("float32")
    assert_close("extrinsic", extrinsic, fx["post.extrinsic"])
    assert_close("intrinsic", intrinsic, fx["post.intrinsic"])


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("own_cameras", [False, True])
def test_unprojection_matches_fixture(fx, backend, own_cameras):
    depth = fx["outputs.depth"][0]  # [S, H, W, 1]
    if own_cameras:
        extrinsic, intrinsic = g.pose_encoding_to_extri_intri(fx["outputs.pose_enc"][0], depth.shape[1:3])
    else:
        extrinsic, intrinsic = fx["post.extrinsic"][0], fx["post.intrinsic"][0]
    if backend == "torch":
        depth, extrinsic, intrinsic = (torch.as_tensor(a) for a in (depth, extrinsic, intrinsic))
    points = g.unproject_depth_map_to_point_map(depth, extrinsic, intrinsic)
    assert type(points) is type(depth)
    assert str(points.dtype).endswith("float32")
    assert tuple(points.shape) == fx["post.world_points_from_depth"].shape
    assert_close("world_points", points, fx["post.world_points_from_depth"])
    squeezed = g.unproject_depth_map_to_point_map(depth[..., 0], extrinsic, intrinsic)
    assert max_abs(squeezed, points) == 0.0


def test_unprojection_float64_numpy_and_pixel_offset(fx):
    depth = fx["outputs.depth"][0]
    args = (depth, fx["post.extrinsic"][0], fx["post.intrinsic"][0])
    ref = fx["post.world_points_from_depth"]
    p64 = g.unproject_depth_map_to_point_map(*args, dtype=np.float64)
    assert p64.dtype == np.float64
    assert_close("world_points", p64, ref)
    shifted = g.unproject_depth_map_to_point_map(*args, pixel_offset=0.5)
    assert max_abs(shifted, ref) > 1e-3  # the half-pixel variant is really different


def test_pose_encoding_roundtrip_fixture(fx):
    pose_enc = fx["outputs.pose_enc"].astype(np.float64)
    hw = fx["outputs.depth"].shape[2:4]
    extrinsic, intrinsic = g.pose_encoding_to_extri_intri(pose_enc, hw)
    back = g.extri_intri_to_pose_encoding(extrinsic, intrinsic, hw)
    quat = pose_enc[..., 3:7] / np.linalg.norm(pose_enc[..., 3:7], axis=-1, keepdims=True)
    quat = np.where(quat[..., 3:4] < 0, -quat, quat)
    np.testing.assert_allclose(back[..., :3], pose_enc[..., :3], atol=1e-12)
    np.testing.assert_allclose(back[..., 3:7], quat, atol=1e-12)
    np.testing.assert_allclose(back[..., 7:], pose_enc[..., 7:], atol=1e-12)
    back_t = g.extri_intri_to_pose_encoding(torch.from_numpy(extrinsic), torch.from_numpy(intrinsic), hw)
    np.testing.assert_allclose(back_t.numpy(), back, atol=1e-12)


# ----------------------------------------------------------------------------- rotations


def test_quat_to_mat_known_rotation_and_norm_invariance():
    s = np.sqrt(0.5)
    rz90 = g.quat_to_mat(np.array([0.0, 0.0, s, s]))
    np.testing.assert_allclose(rz90, [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    q = random_quats(64)
    r1 = g.quat_to_mat(q)
    r2 = g.quat_to_mat(3.7 * q)  # two_s = 2/|q|^2: any scale gives the same rotation
    np.testing.assert_allclose(r1, r2, atol=1e-12)
    np.testing.assert_allclose(r1 @ np.swapaxes(r1, -1, -2), np.broadcast_to(np.eye(3), r1.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(r1), 1.0, atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_mat_to_quat_roundtrip_including_180_degrees(backend):
    q = random_quats(256, seed=1)
    q[:32, 3] = 0.0  # 180-degree rotations: w = 0, a different candidate must be picked
    q /= np.linalg.norm(q, axis=-1, keepdims=True)
    q = np.where(q[..., 3:4] < 0, -q, q)
    rot = g.quat_to_mat(q)
    if backend == "torch":
        rot = torch.from_numpy(rot)
    back = np.asarray(g.mat_to_quat(rot))
    assert (back[:, 3] >= 0).all()
    # q and -q are the same rotation when w = 0: compare up to sign
    err = np.minimum(np.abs(back - q).max(-1), np.abs(back + q).max(-1))
    assert err.max() < 1e-12
    np.testing.assert_allclose(back[32:], q[32:], atol=1e-12)


def test_batched_leading_dims():
    q = random_quats(24).reshape(2, 3, 4, 4)
    rot = g.quat_to_mat(q)
    assert rot.shape == (2, 3, 4, 3, 3)
    assert g.mat_to_quat(rot).shape == (2, 3, 4, 4)


# ----------------------------------------------------------------------------- SE(3)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_closed_form_inverse_and_camera_centers(backend):
    rng = np.random.default_rng(2)
    rot = random_rotations(6, seed=2).reshape(2, 3, 3, 3)
    t = rng.normal(size=(2, 3, 3, 1))
    extr = np.concatenate([rot, t], -1)
    if backend == "torch":
        extr = torch.from_numpy(extr)
    inv = g.closed_form_inverse_se3(extr)
    assert tuple(inv.shape) == (2, 3, 4, 4)
    full = np.concatenate([np.asarray(extr), np.broadcast_to([[[[0, 0, 0, 1.0]]]], (2, 3, 1, 4))], -2)
    np.testing.assert_allclose(np.asarray(inv) @ full, np.broadcast_to(np.eye(4), full.shape), atol=1e-12)
    np.testing.assert_allclose(np.asarray(g.closed_form_inverse_se3(full)), np.asarray(inv), atol=1e-15)
    centers = np.asarray(g.camera_centers(extr))
    # R c + t = 0: the camera centre maps to the camera-frame origin
    np.testing.assert_allclose((rot @ centers[..., None] + t)[..., 0], 0.0, atol=1e-12)


def test_unprojection_reprojects_to_pixel_grid():
    rng = np.random.default_rng(3)
    s, h, w = 3, 14, 28
    depth = rng.uniform(0.5, 4.0, size=(s, h, w))
    extr = np.concatenate([random_rotations(s, seed=3), rng.normal(size=(s, 3, 1))], -1)
    hw = (h, w)
    _, intr = g.pose_encoding_to_extri_intri(np.concatenate(
        [np.zeros((s, 3)), np.tile([0, 0, 0, 1.0], (s, 1)), rng.uniform(0.5, 1.5, size=(s, 2))], -1), hw)
    pts = g.unproject_depth_map_to_point_map(depth, extr, intr)
    cam = np.einsum("sij,shwj->shwi", extr[:, :, :3], pts) + extr[:, None, None, :, 3]
    np.testing.assert_allclose(cam[..., 2], depth, rtol=1e-12)
    pix = np.einsum("sij,shwj->shwi", intr, cam / cam[..., 2:3])
    u, v = np.meshgrid(np.arange(w), np.arange(h))
    np.testing.assert_allclose(pix[..., 0], np.broadcast_to(u, (s, h, w)), atol=1e-9)
    np.testing.assert_allclose(pix[..., 1], np.broadcast_to(v, (s, h, w)), atol=1e-9)


def test_bad_shapes_raise_input_error():
    with pytest.raises(InputError, match=r"\[\.\.\., 9\]"):
        g.pose_encoding_to_extri_intri(np.zeros((2, 8)), (14, 14))
    with pytest.raises(InputError, match="depth"):
        g.unproject_depth_map_to_point_map(np.ones((3, 4, 5)), np.zeros((2, 3, 4)), np.zeros((2, 3, 3)))
    with pytest.raises(InputError, match="se3"):
        g.closed_form_inverse_se3(np.zeros((2, 3, 3)))


# ----------------------------------------------------------------------------- confidence


def test_confidence_mask_percentile_threshold_and_nonfinite():
    conf = np.arange(1, 101, dtype=np.float32).reshape(4, 25)
    assert g.confidence_mask(conf).all()
    keep = g.confidence_mask(conf, percentile=30)
    assert keep.sum() == 70 and not keep.flat[:30].any()
    keep = g.confidence_mask(conf, threshold=90.5)
    assert keep.sum() == 10
    keep = g.confidence_mask(conf, threshold=50, percentile=80)  # both: the stricter wins
    assert keep.sum() == 20
    conf2 = conf.copy()
    conf2[0, 0] = np.nan
    conf2[0, 1] = np.inf
    conf2[0, 2] = 0.0
    keep = g.confidence_mask(conf2)
    assert not keep[0, :3].any() and keep[0, 3:].all()
    with pytest.raises(InputError, match="percentile"):
        g.confidence_mask(conf, percentile=100)


def test_confidence_mask_torch_matches_numpy():
    conf = np.random.default_rng(4).gamma(2.0, 2.0, size=(3, 17, 19)).astype(np.float32) + 1.0
    # 969 values: percentile 37.3 interpolates between two order statistics, 50 hits one exactly
    for kwargs in ({"percentile": 37.3}, {"threshold": 3.0}, {"percentile": 50, "threshold": 2.0}):
        ref = g.confidence_mask(conf, **kwargs)
        ours = g.confidence_mask(torch.from_numpy(conf), **kwargs)
        assert ours.dtype == torch.bool
        np.testing.assert_array_equal(ours.numpy(), ref)


# ----------------------------------------------------------------------------- similarity


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_umeyama_recovers_known_similarity(backend):
    rng = np.random.default_rng(5)
    src = rng.normal(size=(8, 3))
    rot = random_rotations(1, seed=5)[0]
    scale, t = 2.5, np.array([1.0, -2.0, 0.5])
    dst = scale * src @ rot.T + t
    if backend == "torch":
        src, dst = torch.from_numpy(src).float(), torch.from_numpy(dst).float()
    res = g.umeyama_similarity(src, dst)
    tol = 1e-5 if backend == "torch" else 1e-10
    assert abs(res.scale - scale) < tol
    np.testing.assert_allclose(np.asarray(res.R), rot, atol=tol)
    np.testing.assert_allclose(np.asarray(res.t), t, atol=10 * tol)
    assert res.rms < 10 * tol
    aligned = g.apply_similarity(src, res.scale, res.R, res.t)
    np.testing.assert_allclose(np.asarray(aligned), np.asarray(dst), atol=20 * tol)


def test_umeyama_noise_reflection_and_degenerate(caplog):
    rng = np.random.default_rng(6)
    src = rng.normal(size=(20, 3))
    noisy = src + rng.normal(scale=0.01, size=src.shape)
    res = g.umeyama_similarity(src, noisy)
    assert 0.003 < res.rms < 0.03
    mirrored = src * np.array([1.0, 1.0, -1.0])  # best proper rotation, never a reflection
    res = g.umeyama_similarity(src, mirrored)
    assert np.linalg.det(res.R) == pytest.approx(1.0)
    # for the returned R, scale and t must be the least-squares optimum (closed form)
    xs, xd = src - src.mean(0), mirrored - mirrored.mean(0)
    best_scale = np.sum(xd * (xs @ res.R.T)) / np.sum(xs * xs)
    assert res.scale == pytest.approx(best_scale, rel=1e-12)
    np.testing.assert_allclose(res.t, mirrored.mean(0) - best_scale * res.R @ src.mean(0), atol=1e-12)
    line = np.outer(np.arange(4.0), [1.0, 2.0, 3.0])
    with caplog.at_level(logging.WARNING, logger="vggt_trt.recon.geometry"):
        res = g.umeyama_similarity(line, 2 * line + 1)
    assert "collinear" in caplog.text and res.scale == pytest.approx(2.0) and res.rms < 1e-9
    with pytest.raises(InputError, match="at least 2"):
        g.umeyama_similarity(src[:1], src[:1])
    with pytest.raises(InputError, match="coincide"):
        g.umeyama_similarity(np.ones((3, 3)), src[:3])


def test_similarity_transform_extrinsics_consistent_with_points():
    rng = np.random.default_rng(7)
    extr = np.concatenate([random_rotations(3, seed=7), rng.normal(size=(3, 3, 1))], -1)
    rot, scale, t = random_rotations(1, seed=8)[0], 3.0, np.array([0.2, 0.1, -4.0])
    new = g.similarity_transform_extrinsics(extr, scale, rot, t)
    np.testing.assert_allclose(g.camera_centers(new), g.apply_similarity(g.camera_centers(extr), scale, rot, t),
                               atol=1e-12)
    pts = rng.normal(size=(5, 3))
    cam_old = pts @ extr[0, :, :3].T + extr[0, :, 3]
    cam_new = g.apply_similarity(pts, scale, rot, t) @ new[0, :, :3].T + new[0, :, 3]
    np.testing.assert_allclose(cam_new, scale * cam_old, atol=1e-12)


# ----------------------------------------------------------------------------- torch hygiene


def test_torch_float32_path_never_uses_float64(fx):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()

    class DtypeRecorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    seen.add(o.dtype)
            return out

    pose_enc = torch.from_numpy(fx["outputs.pose_enc"])
    depth = torch.from_numpy(fx["outputs.depth"][0])
    conf = torch.from_numpy(fx["outputs.depth_conf"][0])
    with DtypeRecorder():
        extr, intr = g.pose_encoding_to_extri_intri(pose_enc, depth.shape[1:3])
        pts = g.unproject_depth_map_to_point_map(depth, extr[0], intr[0])
        g.confidence_mask(conf, threshold=1.5, percentile=25)
        g.extri_intri_to_pose_encoding(extr, intr, depth.shape[1:3])
        g.umeyama_similarity(g.camera_centers(extr[0]).repeat(2, 1) + torch.randn(4, 3), pts[0, 0, :2].repeat(2, 1))
    assert torch.float32 in seen and torch.float64 not in seen, seen


def test_numpy_path_does_not_import_torch():
    code = (
        "import sys, numpy as np\n"
        "from vggt_trt.recon import geometry as g, pointcloud, preprocess\n"
        "e, k = g.pose_encoding_to_extri_intri(np.array([[0, 0, 0, 0, 0, 0, 1, 1, 1.0]]), (14, 14))\n"
        "g.unproject_depth_map_to_point_map(np.ones((1, 14, 14)), e, k)\n"
        "g.confidence_mask(np.ones(5), percentile=10)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


# ----------------------------------------------------------------------------- exact values and names (issue 19)


def _hand_unprojected(depth, fx, fy, cx, cy):
    """Identity pose: world = camera = ((u - cx) d / fx, (v - cy) d / fy, d), computed here in float64."""
    h, w = depth.shape
    v, u = np.mgrid[0:h, 0:w].astype(np.float64)
    d = depth.astype(np.float64)
    return np.stack([(u - cx) * d / fx, (v - cy) * d / fy, d], -1)


def test_unprojection_of_h_w_1_depth_keeps_float32_and_honours_an_explicit_dtype():
    depth = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.float32)
    extr = np.eye(4, dtype=np.float32)[None, :3]
    intr = np.array([[[2.0, 0, 1.0], [0, 4.0, 0.5], [0, 0, 1]]], np.float32)
    want = _hand_unprojected(depth, 2.0, 4.0, 1.0, 0.5)[None]
    out = g.unproject_depth_map_to_point_map(depth[None, :, :, None], extr, intr)  # [S, H, W, 1] depth
    assert out.dtype == np.float32 and out.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(out, want, rtol=1e-6)
    t = g.unproject_depth_map_to_point_map(torch.from_numpy(depth)[None, :, :, None], torch.from_numpy(extr),
                                           torch.from_numpy(intr))
    assert t.dtype == torch.float32 and t.shape == (1, 2, 3, 3)
    np.testing.assert_allclose(t.numpy(), want, rtol=1e-6)
    t64 = g.unproject_depth_map_to_point_map(torch.from_numpy(depth)[None], torch.from_numpy(extr),
                                             torch.from_numpy(intr), dtype=torch.float64)
    assert t64.dtype == torch.float64
    np.testing.assert_allclose(t64.numpy(), want, rtol=1e-15)


def test_errors_name_the_argument():
    with pytest.raises(InputError, match=r"^depth: expected a numeric array, got dtype <U1$"):
        g.unproject_depth_map_to_point_map(np.array([["a"]]), np.zeros((3, 4)), np.eye(3))
    with pytest.raises(InputError, match=r"^extrinsic: expected shape \[\.\.\., 3x4\], found \[2, 3, 3\]$"):
        g.extri_intri_to_pose_encoding(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)), (14, 14))
    with pytest.raises(InputError, match=r"^image_hw must be \(height, width\), found \(14,\)$"):
        g.extri_intri_to_pose_encoding(np.zeros((2, 3, 4)), np.zeros((2, 3, 3)), (14,))
    with pytest.raises(InputError, match=r"^conf: expected a numeric array, got dtype <U1$"):
        g.confidence_mask(np.array(["a"]), threshold=1.0)
    with pytest.raises(InputError, match=r"^umeyama: all source points coincide; the scale is undetermined$"):
        g.umeyama_similarity(np.ones((4, 3)), np.random.default_rng(0).normal(size=(4, 3)))
