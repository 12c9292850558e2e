"""points.ply recomputed point by point from depth.npz + cameras.json (tiny VGGT on CPU).

The recomputation here is written out by hand (pixel grid, pinhole, camera-to-world), with its own
confidence cut, so a bug in the pipeline's unprojection, alignment or intrinsics mapping cannot cancel
out. Tolerance: the pipeline computes in float32 and writes float32; 2e-5 x (1 + max |xyz|) absolute.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import export_tiny, load_script

from vggt_trt.recon.pointcloud import read_ply

CLI = load_script("pcd_inference.py", "pcd_inference_values")
CAMS = ["cam001", "cam005", "cam012", "cam020"]
SOURCE_K = {"fx": 80.0, "fy": 70.0, "cx": 40.0, "cy": 20.0}  # source pixels (80 x 60), principal point off centre


def _textured(seed: int, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(30, 220, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x, y = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
        draw.rectangle([x, y, x + 9, y + 7], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("values") / "scene"
    for c, cam in enumerate(CAMS):
        (root / cam).mkdir(parents=True)
        _textured(c).save(root / cam / "000000.png")
    return root


def recompute(out: Path, percentile: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World points, colours and confidences that survive the cut, from depth.npz, cameras.json and images/."""
    with np.load(out / "depth.npz") as d:
        depth, conf, scale = d["depth"].astype(np.float64), d["depth_conf"], float(d["metric_scale"])
    cams = json.loads((out / "cameras.json").read_text())["cameras"]
    pts = []
    for i, cam in enumerate(cams):
        e = np.asarray(cam["extrinsic"])
        z = depth[i] * scale  # cameras moved into a metric frame are scaled, so is their depth
        v, u = np.mgrid[0:z.shape[0], 0:z.shape[1]]
        x_cam = np.stack([(u - cam["cx"]) * z / cam["fx"], (v - cam["cy"]) * z / cam["fy"], z], -1)
        pts.append((x_cam - e[:, 3]) @ e[:, :3])  # R^T (x_cam - t)
    world = np.stack(pts)
    finite = np.isfinite(conf)
    keep = finite & (conf > 1e-5) & np.isfinite(world).all(-1)
    if percentile:
        keep &= conf >= np.percentile(conf[finite].astype(np.float64), percentile)
    images = np.stack([np.asarray(Image.open(out / "images" / c["image_name"])) for c in cams])
    return world[keep], images[keep], conf[keep]


def assert_points_match(out: Path, percentile: float) -> dict:
    ply = read_ply(out / "points.ply")
    xyz, rgb, conf = recompute(out, percentile)
    assert ply["xyz"].shape == xyz.shape and xyz.shape[0] > 100
    np.testing.assert_allclose(ply["xyz"], xyz, rtol=0, atol=2e-5 * (1 + np.abs(xyz).max()))
    np.testing.assert_array_equal(ply["rgb"], rgb)
    np.testing.assert_array_equal(ply["conf"], conf)
    return ply


def run(args: list[str]) -> None:
    assert CLI.main(args) == 0


def test_points_are_the_unprojected_depth_with_the_written_cameras(scene: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num-cams", "4", "--conf_percentile", "30",
         "--out-dir", str(out)])
    ply = assert_points_match(out, 30)
    assert abs(ply["xyz"].shape[0] - 0.7 * 4 * 42 * 56) <= 2  # the lowest 30 % of the confidences are gone


def test_poses_alignment_moves_the_points_with_the_cameras(scene: Path, tmp_path: Path) -> None:
    """Cameras moved into the rig frame but points left in VGGT's frame (or not scaled) fail here."""
    base = ["--images", str(scene), "--torch", "--model-name", "tiny", "--num-cams", "4", "--conf_percentile", "0"]
    run(base + ["--out-dir", str(tmp_path / "vggt")])
    angle, scale, trans = 0.4, 3.0, np.array([2.0, -1.0, 5.0])
    rot = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    poses = {}
    for cam in json.loads((tmp_path / "vggt" / "cameras.json").read_text())["cameras"]:
        c2w = np.eye(4)
        c2w[:3, :3] = rot @ np.asarray(cam["extrinsic"])[:, :3].T
        c2w[:3, 3] = scale * rot @ np.asarray(cam["center"]) + trans
        poses[cam["image_name"][:-4]] = c2w.tolist()
    (tmp_path / "poses.json").write_text(json.dumps({"poses": poses}))
    out = tmp_path / "rig"
    run(base + ["--out-dir", str(out), "--poses", str(tmp_path / "poses.json")])
    with np.load(out / "depth.npz") as d:
        assert float(d["metric_scale"]) == pytest.approx(scale, rel=1e-4)
    aligned = assert_points_match(out, 0)
    # and independently of cameras.json: the rig-frame points are the similarity image of the VGGT-frame points
    before = read_ply(tmp_path / "vggt" / "points.ply")["xyz"].astype(np.float64)
    np.testing.assert_allclose(aligned["xyz"], scale * before @ rot.T + trans, atol=1e-4 * (1 + np.abs(before).max()))


def test_pad_preprocessing_maps_known_intrinsics_and_points(scene: Path, tmp_path: Path) -> None:
    (tmp_path / "k.json").write_text(json.dumps(SOURCE_K))
    out = tmp_path / "pad"
    run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num-cams", "2", "--preprocess", "pad",
         "--intrinsics", str(tmp_path / "k.json"), "--conf_percentile", "50", "--out-dir", str(out)])
    cam = json.loads((out / "cameras.json").read_text())["cameras"][0]
    # pad: 80x60 -> 56x42 (x0.7), centred in 56x56 (7 rows of white above): x' = 0.7 x, y' = 0.7 y + 7
    assert (cam["height"], cam["width"]) == (56, 56)
    assert cam["fx"] == pytest.approx(56.0) and cam["fy"] == pytest.approx(49.0)
    assert cam["cx"] == pytest.approx(0.7 * 40.5 - 0.5) and cam["cy"] == pytest.approx(0.7 * 20.5 + 7 - 0.5)
    assert_points_match(out, 50)


def test_fixed_shape_graph_maps_x_and_y_separately(scene: Path, tmp_path: Path,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    """x and y swapped in the pixel map for fixed-shape graphs fail here (the crop is along x only)."""
    onnx_path = export_tiny(tmp_path_factory)  # takes 2 x 3 x 56 x 56
    (tmp_path / "k.json").write_text(json.dumps(SOURCE_K))
    out = tmp_path / "fixed"
    run(["--images", str(scene), "--onnx", str(onnx_path), "--intrinsics", str(tmp_path / "k.json"),
         "--conf_percentile", "40", "--out-dir", str(out)])
    cam = json.loads((out / "cameras.json").read_text())["cameras"][1]
    # cover 56x56 from 80x60: scale 56/60, the centred 60x60 source box starts at x = 10
    s = 56 / 60
    assert cam["fx"] == pytest.approx(80 * s) and cam["fy"] == pytest.approx(70 * s)
    assert cam["cx"] == pytest.approx(s * (40.5 - 10) - 0.5) and cam["cy"] == pytest.approx(s * 20.5 - 0.5)
    assert_points_match(out, 40)
