"""Value checks for the live depth fit, the voxel map, rig files and view/frame selection.

Each test names the kind of bug it exists to catch; expected values are computed here by hand.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt_trt.errors import InputError
from vggt_trt.pipelines.live import CameraCalib, Fit, fit_scale_shift
from vggt_trt.recon import rig
from vggt_trt.recon.voxel_map import VoxelMap


# ----------------------------------------------------------------------------- live depth fit


def test_live_fit_recovers_scale_and_shift_from_synthetic_disparity_and_fuses_depth():
    """The fit is ``1 / depth = scale * disparity + shift``: a fit on depth instead of inverse depth, or a fused
    depth that is not ``1 / (scale * disp + shift)``, fails here."""
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 12.0, 4000)
    scale, shift = 0.37, 0.021
    disp = (1.0 / depth - shift) / scale
    fit = fit_scale_shift(disp, 1.0 / depth)
    assert fit.scale == pytest.approx(scale, rel=1e-9) and fit.shift == pytest.approx(shift, rel=1e-7)
    assert fit.rms < 1e-12 and fit.n == 4000
    fused = 1.0 / (fit.scale * disp + fit.shift)
    np.testing.assert_allclose(fused, depth, rtol=1e-9)
    # depth is not affine in disparity: fitting depth itself leaves a large residual and the wrong depths
    wrong = fit_scale_shift(disp, depth)
    assert wrong.rms > 0.5
    assert np.abs(1.0 / (wrong.scale * disp + wrong.shift) - depth).max() > 1.0


def test_live_fit_is_robust_and_reports_huber_inliers():
    rng = np.random.default_rng(1)
    disp = rng.uniform(0.2, 2.0, 1000)
    target = 0.5 * disp + 0.1 + rng.normal(0, 1e-3, 1000)
    target[:100] += 3.0  # 10 % gross outliers, all on one side
    fit = fit_scale_shift(disp, target)
    assert fit.scale == pytest.approx(0.5, abs=2e-3) and fit.shift == pytest.approx(0.1, abs=2e-3)
    # the outliers have weight < 1; about 80 % of Gaussian residuals lie within 1.345 sigma
    assert 0.65 < fit.inliers < 0.85
    resid = target - (fit.scale * disp + fit.shift)
    assert fit.rms == pytest.approx(np.sqrt(np.mean(resid ** 2)), rel=1e-9)
    # one iteration is plain least squares (all weights 1), pulled by the outliers
    plain = fit_scale_shift(disp, target, iters=1)
    slope, intercept = np.polyfit(disp, target, 1)
    assert plain.scale == pytest.approx(slope, rel=1e-9) and plain.shift == pytest.approx(intercept, rel=1e-9)
    assert abs(plain.shift - 0.1) > 0.1


def test_live_fit_is_the_huber_irls_of_its_docstring():
    """Skewed noise (the residual median is not 0) against an IRLS written here from the definition: weighted
    normal equations, sigma = 1.4826 * median |r - median r|, Huber weight 1 inside 1.345 sigma and
    delta / |r| outside, 10 iterations. A weight cap other than 1 or a MAD around the wrong centre fails."""
    rng = np.random.default_rng(5)
    disp = rng.uniform(0.2, 2.0, 400)
    target = 0.5 * disp + 0.1 + rng.exponential(0.01, 400)
    design = np.column_stack([disp, np.ones_like(disp)])
    w = np.ones(400)
    for _ in range(10):
        coef = np.linalg.solve((design * w[:, None]).T @ design, (design * w[:, None]).T @ target)
        r = target - design @ coef
        delta = 1.345 * 1.4826 * np.median(np.abs(r - np.median(r)))
        w = np.where(np.abs(r) <= delta, 1.0, delta / np.abs(r))
    assert abs(np.median(r)) > 1e-3  # the case really has an off-centre residual median
    fit = fit_scale_shift(disp, target)
    assert fit.scale == pytest.approx(coef[0], rel=1e-9) and fit.shift == pytest.approx(coef[1], rel=1e-9)
    assert fit.inliers == np.mean(w >= 1.0)


def test_live_fit_computes_in_float64_whatever_the_input_dtype():
    rng = np.random.default_rng(2)
    disp = rng.uniform(0.1, 3.0, 500).astype(np.float32)
    target = (0.37 * disp.astype(np.float64) + 0.021).astype(np.float32)
    low, high = fit_scale_shift(disp, target), fit_scale_shift(disp.astype(np.float64), target.astype(np.float64))
    assert (low.scale, low.shift, low.rms) == (high.scale, high.shift, high.rms)


def test_live_fit_needs_ten_pixels():
    x = np.arange(1.0, 11.0)
    fit = fit_scale_shift(x, 2 * x + 1)  # exactly 10: enough
    assert (fit.scale, fit.n) == (pytest.approx(2.0), 10) and fit.shift == pytest.approx(1.0)
    assert fit.inliers == 1.0
    with pytest.raises(InputError, match=r"too few confident pixels.*\(9\)"):
        fit_scale_shift(x[:9], x[:9])


def test_ema_weights_new_fit_by_ema_and_old_value_by_one_minus_ema():
    """Swapped EMA weights (0.7 on the new fit instead of 0.3) fail here."""
    calib = CameraCalib()
    calib.update(Fit(scale=2.0, shift=0.5, rms=0.1, inliers=0.9, n=100), ema=0.3)
    assert (calib.scale, calib.shift, calib.updates, calib.rms) == (2.0, 0.5, 1, 0.1)  # first fit taken whole
    calib.update(Fit(scale=4.0, shift=1.5, rms=0.2, inliers=0.9, n=100), ema=0.3)
    assert calib.scale == pytest.approx(0.7 * 2.0 + 0.3 * 4.0) and calib.shift == pytest.approx(0.7 * 0.5 + 0.3 * 1.5)
    assert calib.updates == 2 and calib.rms == 0.2 and calib.rejected == 0
    calib.update(Fit(scale=10.0, shift=-1.0, rms=0.3, inliers=0.9, n=100), ema=1.0)  # ema 1: the newest only
    assert (calib.scale, calib.shift, calib.updates) == (10.0, -1.0, 3)
    seeded = CameraCalib(scale=1.0, shift=None)  # half a stored calibration: the fit replaces both
    seeded.update(Fit(scale=3.0, shift=0.25, rms=0.0, inliers=1.0, n=10), ema=0.5)
    assert (seeded.scale, seeded.shift) == (3.0, 0.25)


# ----------------------------------------------------------------------------- voxel map


def test_voxel_map_means_counts_and_voxel_boundaries():
    vm = VoxelMap(0.5)
    pts = np.array([[0.1, 0.1, 0.1], [0.4, 0.2, 0.3],  # voxel (0, 0, 0)
                    [0.5, 0.0, 0.0],  # exactly on the boundary: voxel (1, 0, 0)
                    [-0.1, 0.0, 0.0],  # floor, not truncation: voxel (-1, 0, 0)
                    [0.0, 0.6, 0.0], [0.0, 0.0, 0.6]])  # x, y and z land in different voxels
    rgb = np.array([[0, 10, 255], [3, 20, 255], [7, 7, 7], [1, 2, 3], [4, 5, 6], [8, 9, 10]], np.uint8)
    assert vm.insert(pts, rgb, batch=0) == 5 and len(vm) == 5
    xyz, colours, count = vm.points()
    assert xyz.dtype == np.float32 and colours.dtype == np.uint8 and count.dtype == np.float32
    got = {tuple(round(float(v), 4) for v in p): (tuple(int(v) for v in c), float(n))
           for p, c, n in zip(xyz, colours, count)}
    assert got == {(0.25, 0.15, 0.2): ((2, 15, 255), 2.0),  # mean position, rounded mean colour (1.5 -> 2)
                   (0.5, 0.0, 0.0): ((7, 7, 7), 1.0), (-0.1, 0.0, 0.0): ((1, 2, 3), 1.0),
                   (0.0, 0.6, 0.0): ((4, 5, 6), 1.0), (0.0, 0.0, 0.6): ((8, 9, 10), 1.0)}
    # a second batch in an occupied voxel adds to its sums and count, and occupies nothing new
    assert vm.insert(np.array([[0.25, 0.15, 0.2]]), np.array([[2, 15, 255]], np.uint8), batch=1) == 0
    xyz, colours, count = vm.points()
    i = int(np.argmax(count))
    assert count[i] == 3 and np.allclose(xyz[i], [0.25, 0.15, 0.2]) and vm.last.tolist().count(1) == 1
    assert vm.insert(np.empty((0, 3)), np.empty((0, 3), np.uint8), batch=2) == 0 and len(vm) == 5


def test_voxel_map_evicts_oldest_then_least_observed():
    vm = VoxelMap(1.0, max_voxels=3)
    vm.insert(np.array([[0.5, 0, 0], [1.5, 0, 0], [1.6, 0, 0]]), np.zeros((3, 3), np.uint8), batch=0)
    vm.insert(np.array([[2.5, 0, 0]]), np.zeros((1, 3), np.uint8), batch=1)
    vm.insert(np.array([[3.5, 0, 0]]), np.zeros((1, 3), np.uint8), batch=2)  # 4 voxels > 3: evict one
    # batch 0 holds voxels 0 (1 hit) and 1 (2 hits): the least observed of the oldest goes
    assert sorted(np.floor(vm.points()[0][:, 0]).tolist()) == [1.0, 2.0, 3.0] and vm.evicted == 1
    vm.insert(np.array([[0.5, 0, 0], [4.5, 0, 0]]), np.zeros((2, 3), np.uint8), batch=3)  # 5 > 3: evict two
    assert sorted(np.floor(vm.points()[0][:, 0]).tolist()) == [0.0, 3.0, 4.0] and vm.evicted == 3
    assert len(VoxelMap(1.0, max_voxels=1)) == 0
    for bad in ({"voxel_size": 0.0}, {"voxel_size": 1.0, "max_voxels": 0}):
        with pytest.raises(InputError, match="voxel_size must be > 0 and max_voxels >= 1"):
            VoxelMap(**bad)


def test_voxel_map_coordinate_range_is_exclusive():
    limit = 2 ** 20 - 1  # |voxel coordinate| must stay below this
    vm = VoxelMap(1.0)
    pts = np.array([[limit - 0.5, 0, 0], [limit, 0, 0], [0, -(limit - 1) + 0.5, 0], [0, 0, -limit + 0.5],
                    [0, 0, -(limit - 1)]], np.float64)
    assert vm.insert(pts, np.zeros((5, 3), np.uint8), batch=0) == 3
    assert vm.out_of_range == 2
    xyz = vm.points()[0]
    # float32 output: these coordinates are exact in float32 only to 0.125
    np.testing.assert_allclose(sorted(xyz.sum(1).tolist()), [-(limit - 1), -(limit - 1) + 0.5, limit - 0.5], atol=0.13)


# ----------------------------------------------------------------------------- rig files


def test_pose_centres_from_every_layout(tmp_path):
    rot = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rot, [1.0, 2.0, 3.0]
    w2c = np.linalg.inv(c2w)
    names = ["a", "b"]
    cases = {
        "c2w.json": {"poses": {"a": c2w.tolist(), "b": c2w[:3].tolist()}},
        "w2c.json": {"convention": "w2c", "cameras": {"a": w2c.tolist(), "b": w2c[:3].tolist()}},
        "rt.json": {"a": {"R": rot.tolist(), "t": [1, 2, 3]}, "b": {"c2w": c2w.tolist()}},
        "keys.json": {"a": {"center": [1, 2, 3]}, "b": {"w2c": w2c.tolist()}},
        "list.json": [[1, 2, 3], {"position": [1, 2, 3]}],
        "centers.json": {"centers": {"a": [1, 2, 3], "b": [1, 2, 3]}},
        "named.json": [{"name": "b", "centre": [1, 2, 3]}, {"name": "a", "extrinsic": w2c.tolist()}],
    }
    for fname, doc in cases.items():
        path = _write(tmp_path, fname, doc)
        got = rig.load_pose_centers(path, names)
        for n in names:
            np.testing.assert_allclose(got[n], [1.0, 2.0, 3.0], atol=1e-12, err_msg=f"{fname} {n}")
    # the convention may come from the caller: a c2w matrix read as w2c gives -R^T t
    got = rig.load_pose_centers(_write(tmp_path, "plain.json", {"a": c2w.tolist(), "b": c2w.tolist()}), names, "w2c")
    np.testing.assert_allclose(got["a"], -rot.T @ [1.0, 2.0, 3.0], atol=1e-12)
    np.savez(tmp_path / "p.npz", names=np.array(["b", "a"]), centers=np.array([[4.0, 5, 6], [1.0, 2, 3]]))
    got = rig.load_pose_centers(tmp_path / "p.npz", names)
    assert got["a"].tolist() == [1, 2, 3] and got["b"].tolist() == [4, 5, 6]


@pytest.mark.parametrize("doc, convention, message", [
    ({"a": np.eye(4).tolist()}, None, r"no pose for cameras \['b'\]"),
    ({"convention": "w2c", "a": [0, 0, 0], "b": [0, 0, 0]}, "c2w", "contradicts"),
    ({"convention": "cam", "a": [0, 0, 0], "b": [0, 0, 0]}, None, "use c2w"),
    ({"a": [0, 0, 0], "b": {"foo": 1}}, None, "found keys"),
    ({"a": [0, 0, 0], "b": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}, None, "shape"),
    ({"a": [0, 0, 0], "b": [0, np.nan, 0]}, None, "poses file bad.json, camera b: contains non-finite"),
    ({"a": [0, 0, 0], "b": (np.diag([1.0, 1.0, 1.0, 2.0])).tolist()}, None, "0, 0, 0, 1"),
    ({"a": [0, 0, 0], "b": np.diag([1.0, 1.0, -1.0, 1.0]).tolist()}, None, "proper rotation"),
    ({"a": [0, 0, 0], "b": np.diag([1.01, 1.0, 1.0, 1.0]).tolist()}, None, "proper rotation"),
    ({"names": ["a", "b"], "poses": [[0, 0, 0]]}, None, "bad.json: 2 names but 1 values"),
    ({"a": [0, 0, 0], "b": {"center": [1, 2]}}, None, "poses file bad.json, camera b center: shape"),
    ([[0, 0, 0]], None, "1 unnamed entries for 2 cameras"),
    ("just text", None, "expected a mapping or a list"),
])
def test_bad_pose_files_are_named_errors(tmp_path, doc, convention, message):
    with pytest.raises(InputError, match=message):
        rig.load_pose_centers(_write(tmp_path, "bad.json", doc), ["a", "b"], convention)


def test_pose_rotation_tolerance_accepts_rounded_matrices(tmp_path):
    rot = np.round(np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]]), 5)
    c2w = np.concatenate([rot, [[1.0], [2.0], [3.0]]], 1)
    got = rig.load_pose_centers(_write(tmp_path, "rounded.json", {"a": c2w.tolist(), "b": c2w.tolist()}), ["a", "b"])
    assert got["a"].tolist() == [1.0, 2.0, 3.0]


def test_intrinsics_files_and_mapping_to_model_pixels(tmp_path):
    k = [[100.0, 0, 40.0], [0, 90.0, 30.0], [0, 0, 1]]
    shared = {"fx": 100, "fy": 90, "cx": 40, "cy": 30}
    for fname, doc in {"k.json": {"K": k}, "d.json": {"default": shared}, "flat.json": shared, "bare.json": k,
                       "per.json": {"intrinsics": {"a": k, "b": {"K": k}}}, "fx.json": {"a": shared, "b": k}}.items():
        got = rig.load_intrinsics(_write(tmp_path, fname, doc), ["a", "b"])
        for n in ("a", "b"):
            np.testing.assert_array_equal(got[n], k, err_msg=f"{fname} {n}")
    for doc, message in (({"a": k}, r"no intrinsics for cameras \['b'\]"),
                         ({"fx": 1, "fy": -1, "cx": 0, "cy": 0}, "pinhole"),
                         ({"K": [[1, 0, 0], [0, 1, 0], [0, 0, 2]]}, "pinhole"),
                         ({"K": [[1, 0, 0], [0.5, 1, 0], [0, 0, 1]]}, "pinhole"),
                         ({"K": [[0, 0, 0], [0, 1, 0], [0, 0, 1]]}, "pinhole"),
                         ({"a": {"fx": 1}, "b": k}, "intrinsics file badk.json, camera a: expected a 3x3 K")):
        with pytest.raises(InputError, match=message):
            rig.load_intrinsics(_write(tmp_path, "badk.json", doc), ["a", "b"])
    small = rig.load_intrinsics(_write(tmp_path, "small.json", {"fx": 0.5, "fy": 0.5, "cx": 0, "cy": 0}), ["a"])
    assert small["a"][0, 0] == 0.5  # any positive focal length is a pinhole
    # x' = a x + b in pixel-edge coordinates: the pixel centre c + 0.5 maps, then back to OpenCV centres
    mapped = rig.map_intrinsics(np.array([[100.0, 2.0, 40.0], [0, 90.0, 30.0], [0, 0, 1]]), (0.5, 0.25), (3.0, -7.0))
    np.testing.assert_allclose(mapped, [[50.0, 1.0, 0.5 * 40.5 + 3.0 - 0.5], [0, 22.5, 0.25 * 30.5 - 7.0 - 0.5],
                                        [0, 0, 1]], rtol=1e-15)


def test_unsupported_or_broken_rig_files(tmp_path):
    for name, text, message in (("p.txt", "1 2 3", "unsupported format"), ("p.json", "{", "cannot parse"),
                                ("p.yaml", "a: [1, 2", "cannot parse"), ("p.npz", "not a zip", "cannot parse")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InputError, match=message):
            rig.load_pose_centers(tmp_path / name, ["a"])
    with pytest.raises(InputError, match="poses file not found"):
        rig.load_pose_centers(tmp_path / "missing.json", ["a"])
    (tmp_path / "ok.yaml").write_text("a: [1, 2, 3]\n")
    assert rig.load_pose_centers(tmp_path / "ok.yaml", ["a"])["a"].tolist() == [1, 2, 3]


def test_rig_file_keys_names_with_any_value_key_and_agreeing_conventions(tmp_path):
    """Each accepted key is read (a key dropped or misspelt makes the camera 'missing')."""
    names = ["a", "b"]
    for fname, doc in {"centres.json": {"centres": {"a": [1, 2, 3], "b": [4, 5, 6]}},
                       "listed.json": {"names": ["b", "a"], "units": "m", "positions": [[4, 5, 6], [1, 2, 3]]},
                       "agree.json": {"convention": "c2w", "a": [1, 2, 3], "b": [4, 5, 6]}}.items():
        got = rig.load_pose_centers(_write(tmp_path, fname, doc), names, "c2w")
        assert got["a"].tolist() == [1, 2, 3] and got["b"].tolist() == [4, 5, 6], fname
    w2c = np.eye(4)
    w2c[:3, 3] = [1.0, 2.0, 3.0]  # identity rotation: the centre is -t
    got = rig.load_pose_centers(_write(tmp_path, "w2c.json", {"convention": "W2C", "a": w2c.tolist(),
                                                             "b": w2c.tolist()}), names, "w2c")
    assert got["a"].tolist() == [-1.0, -2.0, -3.0]
    k = [[100.0, 0, 40.0], [0, 90.0, 30.0], [0, 0, 1]]
    got = rig.load_intrinsics(_write(tmp_path, "cams.json", {"cameras": {"a": k, "b": {"K": k}}}), names)
    assert got["a"].tolist() == k and got["b"].tolist() == k


@pytest.mark.parametrize("doc, message", [
    ({"a": "abc", "b": [0, 0, 0]}, r"^poses file bad\.json, camera a: not a numeric array \(could not convert"),
    ({"a": {"R": np.diag([1.0, 1.0, -1.0]).tolist(), "t": [0, 0, 0]}, "b": [0, 0, 0]},
     r"^poses file bad\.json, camera a: the rotation part is not a proper rotation"),
    ([[0, 0, 0]], r"^poses file \S*bad\.json lists 1 unnamed entries for 2 cameras \(a, b\); give names"),
])
def test_pose_errors_start_with_the_file_and_camera(tmp_path, doc, message):
    with pytest.raises(InputError, match=message):
        rig.load_pose_centers(_write(tmp_path, "bad.json", doc), ["a", "b"])


def test_intrinsics_count_error_starts_with_the_file(tmp_path):
    k = [[100.0, 0, 40.0], [0, 90.0, 30.0], [0, 0, 1]]
    with pytest.raises(InputError, match=r"^intrinsics file \S*bad\.json lists 1 unnamed entries for 2 cameras"):
        rig.load_intrinsics(_write(tmp_path, "bad.json", [k]), ["a", "b"])


def test_rig_log_messages(tmp_path, caplog):
    doc = {n: [0, 0, 0] for n in ["a", "b"] + [f"c{i}" for i in range(9)]}
    pku = tmp_path / "pku"
    for cam in ("cam02", "cam01"):
        _img(pku / cam / "000000.png")
    (pku / "notes").mkdir()
    with caplog.at_level(logging.DEBUG, logger="vggt_trt.recon.rig"):
        rig.load_pose_centers(_write(tmp_path, "extra.json", doc), ["a", "b"])
        rig.discover_scene(pku)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "poses file extra.json: ignoring 9 cameras not used here (c0, c1, c2, c3, c4, c5, c6, c7)",
        f"loaded 2 known camera poses from {tmp_path / 'extra.json'} (c2w)",
        f"{pku / 'notes'} holds no images; not a camera folder",
        f"scene {pku}: PKU-style, 2 cameras (cam01, cam02)",
    ]


# ----------------------------------------------------------------------------- scenes and view selection


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(path)
    return path


def test_scene_layouts_and_camera_names(tmp_path, caplog):
    pku = tmp_path / "pku"
    for cam, n in (("cam02", 3), ("cam01", 1)):
        for f in range(n):
            _img(pku / cam / f"{f:06d}.png")
    (pku / "notes").mkdir()
    (pku / ".hidden").mkdir()
    _img(pku / ".hidden" / "x.png")
    _img(pku / "loose.png")
    with caplog.at_level(logging.WARNING, logger="vggt_trt.recon.rig"):
        scene = rig.discover_scene(pku)
    assert scene.layout == "pku" and scene.names == ["cam01", "cam02"] and "ignoring 1 images" in caplog.text
    assert [p.name for p in scene.frames["cam02"]] == ["000000.png", "000001.png", "000002.png"]
    flat = tmp_path / "flat"
    for name in ("b view.png", "a.png"):
        _img(flat / name)
    scene = rig.discover_scene(flat)
    assert scene.layout == "flat" and scene.names == ["a", "b_view"] and scene.frames["b_view"][0].name == "b view.png"
    _img(flat / "b  view.jpg")
    with pytest.raises(InputError, match="two images map to the view name 'b_view'"):
        rig.discover_scene(flat)


def test_candidate_views_explicit_random_and_default():
    scene = rig.Scene(Path("."), "pku", {f"c{i}": [] for i in range(6)})
    assert rig.candidate_views(scene) == (scene.names, False)
    assert rig.candidate_views(scene, random_views=2)[0] == random.Random(0).sample(scene.names, 6)  # seed 0
    assert rig.candidate_views(scene, ["c3", "c1"]) == (["c3", "c1"], True)
    order, explicit = rig.candidate_views(scene, random_views=2, seed=7)
    assert order == random.Random(7).sample(scene.names, 6) and not explicit
    assert rig.candidate_views(scene, random_views=6, seed=7)[0] == order  # every camera may be asked for
    for kwargs, message in (({"views": ["c1"], "random_views": 1}, "not both"), ({"views": ["c9"]}, "not found in .*cameras there: c0, c1, c2"),
                            ({"views": ["c1", "c1"]}, "twice"), ({"random_views": 7}, "only 6 cameras")):
        with pytest.raises(InputError, match=message):
            rig.candidate_views(scene, **kwargs)


def test_frame_selection_picks_frame_n_and_skips_cameras_without_it(tmp_path):
    """Off-by-one in the frame bounds (a camera with exactly N frames asked for frame N) fails here."""
    from vggt_trt.pipelines.pcd import PcdOptions, select_views

    root = tmp_path / "scene"
    for cam, n in (("cam1", 3), ("cam2", 2), ("cam3", 3), ("cam4", 4)):
        for f in range(n):
            _img(root / cam / f"{f:06d}.png")
    scene = rig.discover_scene(root)
    opts = PcdOptions(images=root, out_dir=tmp_path / "out", frame=2)
    names, paths, skipped = select_views(scene, opts, 3)
    assert names == ["cam1", "cam3", "cam4"] and [p.name for p in paths] == ["000002.png"] * 3
    assert [p.parent.name for p in paths] == names
    assert skipped == [{"view": "cam2", "reason": "no frame 2 (camera has 2)"}]
    names, paths, _ = select_views(scene, PcdOptions(images=root, out_dir=tmp_path, frame=1), 2)
    assert names == ["cam1", "cam2"] and [p.name for p in paths] == ["000001.png"] * 2  # the first `needed` cameras
    names, _, _ = select_views(scene, PcdOptions(images=root, out_dir=tmp_path, frame=3), 1)
    assert names == ["cam4"]
    with pytest.raises(InputError, match=r"only 1 readable views, 2 needed.*cam1: +no frame 3 \(camera has 3\)"):
        select_views(scene, PcdOptions(images=root, out_dir=tmp_path, frame=3), 2)
    random_pick = select_views(scene, PcdOptions(images=root, out_dir=tmp_path, random_views=2, seed=5), None)[0]
    assert random_pick == random.Random(5).sample(scene.names, 4)[:2]


def test_live_camera_selection_picks_the_named_or_first_cameras():
    from vggt_trt.pipelines.sources import CameraSpec, select_cameras

    cams = [CameraSpec(name=f"c{i}", target=i, live=True) for i in range(4)]
    assert [c.name for c in select_cameras(cams, num_cams=2)] == ["c0", "c1"]
    assert [c.name for c in select_cameras(cams, views=["c2", "c0"])] == ["c2", "c0"]
    assert [c.name for c in select_cameras(cams, random_views=3, seed=1)] == random.Random(1).sample(
        ["c0", "c1", "c2", "c3"], 4)[:3]
    assert len(select_cameras(cams, num_cams=4)) == 4
    with pytest.raises(InputError, match="only 4 cameras"):
        select_cameras(cams, num_cams=5)


# ----------------------------------------------------------------------------- helpers

def _write(folder: Path, name: str, doc) -> Path:
    path = folder / name
    path.write_text(json.dumps(doc))
    return path


# ----------------------------------------------------------------------------- point-cloud files and filters


def test_colours_of_every_dtype_and_colmap_defaults(tmp_path):
    from vggt_trt.recon.pointcloud import read_ply, write_colmap_text, write_ply

    xyz = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]], np.float32)
    write_ply(tmp_path / "i.ply", xyz, np.array([[-5, 300, 7], [0, 255, 256]], np.int64))  # ints: clipped
    got = read_ply(tmp_path / "i.ply")
    assert set(got) == {"xyz", "rgb"} and got["rgb"].tolist() == [[0, 255, 7], [0, 255, 255]]
    write_ply(tmp_path / "f.ply", xyz, np.array([[0.5, -1.0, np.nan], [1.5, 0.998, 0.002]]))  # floats: 0..1
    assert read_ply(tmp_path / "f.ply")["rgb"].tolist() == [[128, 0, 0], [255, 254, 1]]
    with pytest.raises(InputError, match="conf has 1 values for 2 points"):
        write_ply(tmp_path / "c.ply", xyz, None, np.ones(1))
    paths = write_colmap_text(tmp_path / "m", np.eye(4)[None, :3], np.eye(3)[None], ["a.png"], (4, 6), xyz)
    rows = [r for r in paths["points3D"].read_text().splitlines() if not r.startswith("#")]
    assert rows == ["1 0 1 2 128 128 128 0", "2 3 4 5 128 128 128 0"]  # no colours: mid grey
    assert "# Number of points: 2, mean track length: 0" in paths["points3D"].read_text()
    assert "# Number of cameras: 1" in paths["cameras"].read_text()
    assert "# Number of images: 1, mean observations per image: 0" in paths["images"].read_text()
    write_colmap_text(tmp_path / "m", np.eye(4)[None, :3], np.eye(3)[None], ["a.png"], (4, 6), xyz)  # folder exists
    empty = write_colmap_text(tmp_path / "e", np.eye(4)[None, :3], np.eye(3)[None], ["a.png"], (4, 6))
    assert [r for r in empty["points3D"].read_text().splitlines() if not r.startswith("#")] == []


def test_read_ply_keeps_other_properties_and_needs_xyz(tmp_path):
    from plyfile import PlyData, PlyElement

    from vggt_trt.recon.pointcloud import read_ply

    v = np.array([(1.0, 2.0, 3.0, 0.5)], dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("nx", "f4")])
    PlyData([PlyElement.describe(v, "vertex")]).write(str(tmp_path / "n.ply"))
    got = read_ply(tmp_path / "n.ply")
    assert set(got) == {"xyz", "nx"} and got["xyz"].tolist() == [[1, 2, 3]] and got["nx"].tolist() == [0.5]
    w = np.array([(1.0, 2.0)], dtype=[("x", "f4"), ("y", "f4")])
    PlyData([PlyElement.describe(w, "vertex")]).write(str(tmp_path / "xy.ply"))
    with pytest.raises(InputError, match="no x/y/z"):
        read_ply(tmp_path / "xy.ply")


def test_voxel_downsample_edges():
    from vggt_trt.recon.pointcloud import voxel_downsample

    xyz = np.array([[0.0, 0.0, 0.0], [0.99, 0.5, 0.5], [1.0, 0.0, 0.0], [-0.01, 0.0, 0.0]], np.float64)
    conf = np.array([1.0, 3.0, 2.0, 5.0], np.float32)
    out, _, c = voxel_downsample(xyz, None, conf, 1.0)
    # voxels ordered by key: x = -1, then 0 (two points), then 1; a boundary point goes to the upper voxel
    np.testing.assert_allclose(out, [[-0.01, 0, 0], [0.495, 0.25, 0.25], [1.0, 0, 0]])
    assert out.dtype == np.float64 and c.tolist() == [5.0, 3.0, 2.0]
    _, _, mean = voxel_downsample(xyz, None, conf, 1.0, conf_reduce="mean")
    assert mean.tolist() == [5.0, 2.0, 2.0] and mean.dtype == np.float32
    out_i, rgb_f, _ = voxel_downsample(np.array([[0, 0, 0], [0, 0, 0]], np.int32),
                                       np.array([[0.1, 0.2, 0.3], [0.2, 0.2, 0.2]]), None, 1.0)
    assert out_i.dtype == np.float32 and rgb_f.tolist() == [[0.15000000000000002, 0.2, 0.25]]
    far = np.array([[0.0, 0, 0], [4e6, 4e6, 4e6], [4e6, 4e6, 4e6 + 0.5]])  # extent^3 >= 2^62: row-wise keys
    out, _, _ = voxel_downsample(far, None, None, 1.0)
    np.testing.assert_allclose(out, [[0, 0, 0], [4e6, 4e6, 4e6 + 0.25]])
    empty = voxel_downsample(np.empty((0, 3)), np.empty((0, 3), np.uint8), np.empty(0), 0.5)
    assert [a.shape for a in empty] == [(0, 3), (0, 3), (0,)]
    for args, message in (((xyz, None, None, 1.0, "median"), "conf_reduce"), ((xyz, np.zeros((3, 3)), None, 1.0),
                          "rgb has 3 colours for 4 points"), ((xyz, None, conf[:3], 1.0), "conf has 3 values"),
                          ((np.array([[np.nan, 0, 0]]), None, None, 1.0), "non-finite")):
        with pytest.raises(InputError, match=message):
            voxel_downsample(*args)


def test_filter_points_shapes_and_mask_only():
    import torch

    from vggt_trt.recon.pointcloud import filter_points

    xyz = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    mask = np.array([[True, False, True, False], [False, False, False, True]])
    conf = np.array([[1.0, 2.0, 3.0, 2.5], [0.5, 2.0, 1.9, 4.0]])
    px, _, pconf = filter_points(xyz, conf=conf, threshold=2.0)  # a threshold alone, on the cut
    assert pconf.tolist() == [2.0, 3.0, 2.5, 2.0, 4.0] and px.shape == (5, 3)
    for backend in (np.asarray, torch.from_numpy):
        px, prgb, pconf = filter_points(backend(xyz), mask=backend(mask))
        assert np.asarray(px).tolist() == [[0, 1, 2], [6, 7, 8], [21, 22, 23]] and prgb is None and pconf is None
    px, _, _ = filter_points(xyz[0, 0])  # one point, no leading dims
    assert px.tolist() == [[0, 1, 2]]
    for kwargs, message in (({"conf": np.ones(3)}, "conf shape"), ({"mask": np.ones(3, bool)}, "mask shape"),
                            ({"rgb": np.ones((2, 4))}, "rgb shape"), ({"percentile": 5}, "needs conf")):
        with pytest.raises(InputError, match=message):
            filter_points(xyz, **kwargs)
    with pytest.raises(InputError, match=r"\[\.\.\., 3\]"):
        filter_points(xyz[..., :2])


def test_cameras_files_accept_model_batches_and_report_bad_input(tmp_path):
    from vggt_trt.recon.pointcloud import read_cameras_json, write_cameras_json

    extr = np.tile(np.eye(4)[:3], (2, 1, 1))
    extr[1, :, 3] = [1.0, 2.0, 3.0]
    intr = np.tile(np.diag([10.0, 20.0, 1.0]), (2, 1, 1))
    write_cameras_json(tmp_path / "c.json", extr[None], intr[None], ["a", "b"], [[4, 6], [8, 10]])
    doc = json.loads((tmp_path / "c.json").read_text())["cameras"][1]
    assert (doc["height"], doc["width"], doc["fx"], doc["fy"], doc["center"]) == (8, 10, 10.0, 20.0, [-1, -2, -3])
    intr[:, :2, 2] = [[3.0, 4.0], [5.0, 6.0]]
    square = np.concatenate([extr, np.tile([[[0, 0, 0, 1.0]]], (2, 1, 1))], 1)  # 4x4 cameras are accepted
    write_cameras_json(tmp_path / "c4.json", square, intr, ["a", "b"], (4, 6))
    doc = json.loads((tmp_path / "c4.json").read_text())["cameras"][1]
    assert (doc["cx"], doc["cy"], len(doc["extrinsic"])) == (5.0, 6.0, 3)
    assert read_cameras_json(tmp_path / "c.json")["image_hw"].tolist() == [[4, 6], [8, 10]]
    for args, message in (((extr[:, :2], intr), r"\[S, 3, 4\]"), ((extr, intr[:1]), r"intrinsic: expected \[2, 3, 3\]"),
                          ((extr, intr, ["a", "b"], [4, 6, 8]), "image_hw")):
        full = args + (["a", "b"], (4, 6))[len(args) - 2:]
        with pytest.raises(InputError, match=message):
            write_cameras_json(tmp_path / "x.json", *full)
    (tmp_path / "bad.json").write_text('{"cameras": [{"extrinsic": 1}]}')
    with pytest.raises(InputError, match="cannot read cameras JSON"):
        read_cameras_json(tmp_path / "bad.json")
    with pytest.raises(InputError, match="cameras file not found"):
        read_cameras_json(tmp_path / "none.json")


def test_colours_clip_below_zero_and_above_one_on_both_paths():
    """Values outside [0, 1] (bicubic overshoot) clip to 0 and 255 in numpy and torch alike."""
    import torch

    from vggt_trt.recon.pointcloud import colors_from_images

    values = np.array([-0.5, -0.001, 0.0, 0.502, 1.0, 1.7], np.float32)  # 0.502 * 255 = 128.01
    images = values.reshape(1, 3, 1, 2)
    want = np.array([0, 0, 0, 128, 255, 255], np.uint8).reshape(1, 3, 1, 2).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(colors_from_images(images), want)
    np.testing.assert_array_equal(colors_from_images(torch.from_numpy(images)).numpy(), want)


def test_filter_points_threshold_without_conf_message():
    from vggt_trt.recon.pointcloud import filter_points

    with pytest.raises(InputError, match=r"^a confidence threshold/percentile needs conf$"):
        filter_points(np.zeros((2, 3)), threshold=0.5)


def test_cameras_json_sizes_written_as_floats_read_back_as_integers(tmp_path):
    from vggt_trt.recon.pointcloud import read_cameras_json

    cam = {"image_name": "a", "height": 4.0, "width": 6.0, "extrinsic": np.eye(4)[:3].tolist(),
           "intrinsic": np.eye(3).tolist()}
    hw = read_cameras_json(_write(tmp_path, "c.json", {"cameras": [cam]}))["image_hw"]
    assert hw.dtype == np.int64 and hw.tolist() == [[4, 6]]


def test_colmap_headers_name_error_and_log(tmp_path, caplog):
    from vggt_trt.recon.pointcloud import write_colmap_text

    xyz = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    with caplog.at_level(logging.INFO, logger="vggt_trt.recon.pointcloud"):
        paths = write_colmap_text(tmp_path / "m", np.eye(4)[None, :3], np.eye(3)[None], ["a.png"], (4, 6), xyz)
    assert [r.getMessage() for r in caplog.records] == [
        f"wrote COLMAP text model (1 cameras, 2 points) to {tmp_path / 'm'}"]
    # the header lines COLMAP's own text writer puts in images.txt
    assert paths["images"].read_text().splitlines()[:4] == [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
        "# Number of images: 1, mean observations per image: 0"]
    extr, intr = np.tile(np.eye(4)[:3], (4, 1, 1)), np.tile(np.eye(3), (4, 1, 1))
    with pytest.raises(InputError, match=r"^COLMAP image names cannot be empty or contain whitespace: "
                                         r"\['a b', 'c d', ''\]$"):  # the first three
        write_colmap_text(tmp_path / "bad", extr, intr, ["a b", "c d", "", "g\th"], (4, 6))
