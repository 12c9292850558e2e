"""PLY, voxel downsampling, filtering, colours, cameras JSON and COLMAP text export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plyfile import PlyData

from vggt_trt.recon import geometry as g
from vggt_trt.errors import InputError
from vggt_trt.recon.pointcloud import (
    colors_from_images,
    filter_points,
    read_cameras_json,
    read_ply,
    voxel_downsample,
    write_cameras_json,
    write_colmap_text,
    write_ply,
)


@pytest.fixture()
def cloud():
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(2, 6, 7, 3)).astype(np.float32)
    rgb = rng.integers(0, 256, size=(2, 6, 7, 3), dtype=np.uint8)
    conf = rng.uniform(1, 5, size=(2, 6, 7)).astype(np.float32)
    return xyz, rgb, conf


@pytest.fixture()
def cameras():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(3, 4))
    rot = g.quat_to_mat(q)
    extr = np.concatenate([rot, rng.normal(size=(3, 3, 1))], -1)
    intr = np.tile(np.array([[50.0, 0, 35], [0, 48.0, 28], [0, 0, 1]]), (3, 1, 1))
    intr[:, 0, 0] += np.arange(3)
    return extr, intr, ["cam001.jpg", "cam002.jpg", "sub_cam003.png"], (56, 70)


def test_ply_roundtrip_binary_le(tmp_path, cloud):
    xyz, rgb, conf = cloud
    path = write_ply(tmp_path / "out" / "cloud.ply", xyz, rgb, conf)
    ply = PlyData.read(str(path))
    assert not ply.text and ply.byte_order == "<"
    props = {p.name: p.val_dtype for p in ply["vertex"].properties}
    assert list(props) == ["x", "y", "z", "red", "green", "blue", "confidence"]
    assert [props[k] for k in ("x", "red", "confidence")] == ["f4", "u1", "f4"]
    back = read_ply(path)
    np.testing.assert_array_equal(back["xyz"], xyz.reshape(-1, 3))
    np.testing.assert_array_equal(back["rgb"], rgb.reshape(-1, 3))
    np.testing.assert_array_equal(back["conf"], conf.reshape(-1))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["cloud.ply"]  # no temp files left


def test_ply_float_colours_xyz_only_and_errors(tmp_path, cloud):
    xyz, rgb, _ = cloud
    write_ply(tmp_path / "f.ply", torch.from_numpy(xyz), rgb.astype(np.float32) / 255)
    np.testing.assert_array_equal(read_ply(tmp_path / "f.ply")["rgb"], rgb.reshape(-1, 3))
    write_ply(tmp_path / "xyz.ply", xyz)
    assert set(read_ply(tmp_path / "xyz.ply")) == {"xyz"}
    with pytest.raises(InputError, match="colours"):
        write_ply(tmp_path / "bad.ply", xyz, rgb[:1])
    with pytest.raises(InputError, match=r"\[\.\.\., 3\]"):
        write_ply(tmp_path / "bad.ply", xyz[..., :2])
    assert not (tmp_path / "bad.ply").exists()
    with pytest.raises(InputError, match="missing.ply"):
        read_ply(tmp_path / "missing.ply")
    (tmp_path / "garbage.ply").write_bytes(b"not a ply file")
    with pytest.raises(InputError, match="garbage.ply"):
        read_ply(tmp_path / "garbage.ply")


def test_voxel_downsample_matches_bruteforce(cloud):
    xyz, rgb, conf = (a.reshape(-1, *a.shape[3:]) for a in cloud)
    voxel = 0.7
    out_xyz, out_rgb, out_conf = voxel_downsample(xyz, rgb, conf, voxel)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(map(tuple, np.floor(xyz.astype(np.float64) / voxel).astype(int))):
        groups.setdefault(key, []).append(i)
    keys = sorted(groups)
    assert len(out_xyz) == len(keys) < len(xyz)
    for j, key in enumerate(keys):
        idx = groups[key]
        np.testing.assert_allclose(out_xyz[j], xyz[idx].astype(np.float64).mean(0), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(out_rgb[j], np.round(rgb[idx].mean(0)).astype(np.uint8))
        assert out_conf[j] == conf[idx].max()
    _, _, mean_conf = voxel_downsample(xyz, None, conf, voxel, conf_reduce="mean")
    np.testing.assert_allclose(mean_conf, [conf[groups[k]].mean() for k in keys], rtol=1e-6)
    assert out_xyz.dtype == np.float32 and out_rgb.dtype == np.uint8
    with pytest.raises(InputError, match="voxel_size"):
        voxel_downsample(xyz, None, None, 0)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_filter_points(cloud, backend):
    xyz, rgb, conf = (a.copy() for a in cloud)
    xyz[0, 0, 0] = np.nan
    xyz[1, 2, 3, 1] = np.inf
    extra = np.ones(conf.shape, bool)
    extra[1, 5] = False
    if backend == "torch":
        xyz, rgb, conf, extra = (torch.from_numpy(a) for a in (xyz, rgb, conf, extra))
    px, pc, pf = filter_points(xyz, rgb, conf, threshold=1.5, percentile=20, mask=extra)
    xn, cn, fn = (np.asarray(a) for a in (xyz, conf, extra))
    finite_conf = cn[np.isfinite(cn)]
    expect = (np.isfinite(xn).all(-1) & (cn >= 1.5) & (cn >= np.percentile(finite_conf, 20)) & fn)
    assert type(px) is type(xyz)
    np.testing.assert_array_equal(np.asarray(px), xn[expect])
    np.testing.assert_array_equal(np.asarray(pc), np.asarray(rgb)[expect])
    np.testing.assert_array_equal(np.asarray(pf), cn[expect])
    assert np.isfinite(np.asarray(px)).all() and 0 < len(px) < expect.size
    with pytest.raises(InputError, match="needs conf"):
        filter_points(xyz, threshold=1.0)


def test_colors_from_images_recovers_8bit_values():
    rng = np.random.default_rng(2)
    pix = rng.integers(0, 256, size=(2, 5, 6, 3), dtype=np.uint8)
    # values between 8-bit levels (as after resampling) go to the nearest level, not the one below
    jitter = rng.uniform(-0.45, 0.45, size=pix.shape) / 255
    images = (pix / 255 + jitter).clip(0, 1).transpose(0, 3, 1, 2).astype(np.float32)
    np.testing.assert_array_equal(colors_from_images(images), pix)
    t = colors_from_images(torch.from_numpy(images))
    assert t.dtype == torch.uint8 and t.shape == (2, 5, 6, 3)
    np.testing.assert_array_equal(t.numpy(), pix)
    with pytest.raises(InputError, match="S, 3, H, W"):
        colors_from_images(images[:, :2])


def test_cameras_json_roundtrip(tmp_path, cameras):
    extr, intr, names, hw = cameras
    path = write_cameras_json(tmp_path / "cameras.json", extr[None], intr[None], names, hw)
    back = read_cameras_json(path)
    np.testing.assert_array_equal(back["extrinsic"], extr)
    np.testing.assert_array_equal(back["intrinsic"], intr)
    assert back["image_names"] == names
    np.testing.assert_array_equal(back["image_hw"], [[56, 70]] * 3)
    import json

    cam = json.loads(path.read_text())["cameras"][1]
    np.testing.assert_allclose(cam["center"], g.camera_centers(extr)[1], atol=1e-12)
    with pytest.raises(InputError, match="image names"):
        write_cameras_json(tmp_path / "x.json", extr, intr, names[:2], hw)


def hamilton_wxyz_to_matrix(w, x, y, z):
    """Textbook unit-quaternion rotation matrix (independent of vggt_trt.recon.geometry)."""
    n = np.sqrt(w * w + x * x + y * y + z * z)
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def test_colmap_text_export(tmp_path, cameras, cloud):
    extr, intr, names, hw = cameras
    xyz = cloud[0].reshape(-1, 3)[:10]
    rgb = cloud[1].reshape(-1, 3)[:10]
    paths = write_colmap_text(tmp_path / "sparse" / "0", extr, intr, names, hw, xyz, rgb)
    assert {p.name for p in (tmp_path / "sparse" / "0").iterdir()} == {"cameras.txt", "images.txt", "points3D.txt"}

    cam_rows = [ln.split() for ln in paths["cameras"].read_text().splitlines() if not ln.startswith("#")]
    assert len(cam_rows) == 3
    for i, row in enumerate(cam_rows):
        assert row[:4] == [str(i + 1), "PINHOLE", "70", "56"]
        np.testing.assert_allclose([float(v) for v in row[4:]],
                                   [intr[i, 0, 0], intr[i, 1, 1], intr[i, 0, 2], intr[i, 1, 2]], rtol=1e-15)

    lines = [ln for ln in paths["images"].read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 6 and all(ln == "" for ln in lines[1::2])  # empty 2D-points lines
    for i, ln in enumerate(lines[0::2]):
        f = ln.split()
        assert f[0] == str(i + 1) and f[8] == str(i + 1) and f[9] == names[i]
        qw, qx, qy, qz = (float(v) for v in f[1:5])
        assert qw >= 0
        np.testing.assert_allclose(hamilton_wxyz_to_matrix(qw, qx, qy, qz), extr[i, :, :3], atol=1e-12)
        np.testing.assert_allclose([float(v) for v in f[5:8]], extr[i, :, 3], rtol=1e-15)

    pts = [ln.split() for ln in paths["points3D"].read_text().splitlines() if not ln.startswith("#")]
    assert len(pts) == 10
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:4]] for r in pts]), xyz, rtol=1e-6)
    np.testing.assert_array_equal(np.array([[int(v) for v in r[4:7]] for r in pts]), rgb)
    assert [int(r[0]) for r in pts] == list(range(1, 11)) and all(len(r) == 8 for r in pts)
    with pytest.raises(InputError, match="whitespace"):
        write_colmap_text(tmp_path / "bad", extr, intr, ["a b.jpg", "c", "d"], hw)
