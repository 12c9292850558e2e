"""pcd_inference.py --source images on generated multi-view scenes (tiny preset, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from helpers import export_tiny, load_script  # noqa: E402
ROOT = Path(__file__).resolve().parents[1]
CAMS = ["cam001", "cam005", "cam012", "cam020", "cam024"]


CLI = load_script("pcd_inference.py", "pcd_inference_cli")


def _textured(seed: int, size: tuple[int, int] = (80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in rng.integers(30, 220, 3)))
    draw = ImageDraw.Draw(img)
    for _ in range(25):
        x, y = (int(v) for v in rng.integers(0, size[0], 1).tolist() + rng.integers(0, size[1], 1).tolist())
        draw.rectangle([x, y, x + 9, y + 7], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        draw.line([0, y, size[0], (y * 3) % size[1]], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def make_pku_scene(root: Path, cams: list[str] = CAMS, frames: int = 2) -> Path:
    for c, cam in enumerate(cams):
        (root / cam).mkdir(parents=True)
        for f in range(frames):
            _textured(10 * c + f).save(root / cam / f"{f:06d}.jpg")
    return root


@pytest.fixture()
def scene(tmp_path: Path) -> Path:
    return make_pku_scene(tmp_path / "scene")


def _run(args: list[str]) -> int:
    return CLI.main(args)


def test_pku_scene_to_point_cloud(scene: Path, tmp_path: Path) -> None:
    from vggt_trt.recon.pointcloud import read_cameras_json, read_ply

    out = tmp_path / "out"
    rc = _run(["--source", "images", "--images", str(scene), "--views", "cam001,cam005,cam012,cam020",
               "--torch", "--model-name", "tiny", "--out_dir", str(out), "--voxel_size", "0.001"])
    assert rc == 0
    ply = read_ply(out / "points.ply")
    assert ply["xyz"].shape[0] > 100 and np.isfinite(ply["xyz"]).all()
    assert ply["rgb"].dtype == np.uint8 and ply["rgb"].shape == ply["xyz"].shape and ply["rgb"].std() > 0
    assert np.isfinite(ply["conf"]).all()
    cams = read_cameras_json(out / "cameras.json")
    assert cams["image_names"] == [f"{c}.png" for c in CAMS[:4]] and cams["extrinsic"].shape == (4, 3, 4)
    for name in ("cameras.txt", "images.txt", "points3D.txt"):
        assert (out / "sparse" / "0" / name).is_file()
    images_txt = (out / "sparse" / "0" / "images.txt").read_text()
    assert "cam012.png" in images_txt
    assert sorted(p.name for p in (out / "images").iterdir()) == cams["image_names"]
    with np.load(out / "depth.npz") as d:
        assert d["depth"].shape == (4, 42, 56) and d["depth_conf"].shape == (4, 42, 56)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scene"]["layout"] == "pku" and summary["scene"]["views"] == CAMS[:4]
    pts = summary["points"]
    assert pts["total"] == 4 * 42 * 56 and pts["written"] == ply["xyz"].shape[0] <= pts["after_filter"] < pts["total"]
    for stage in ("preprocess", "inference", "decode", "unproject", "colour", "filter", "voxel", "write"):
        assert summary["timings_ms"][stage] >= 0
    assert summary["alignment"] is None and not list(out.glob(".*.tmp"))


def _poses_from(cameras_json: Path, scale: float, rot: np.ndarray, trans: np.ndarray) -> dict[str, list]:
    """Known c2w poses = a similarity transform of VGGT's own cameras (so the fit is exact)."""
    doc = json.loads(cameras_json.read_text())
    poses = {}
    for cam in doc["cameras"]:
        e = np.asarray(cam["extrinsic"])
        c2w = np.eye(4)
        c2w[:3, :3] = rot @ e[:, :3].T
        c2w[:3, 3] = scale * rot @ np.asarray(cam["center"]) + trans
        poses[cam["image_name"][:-4]] = c2w.tolist()
    return poses


def test_alignment_to_known_poses(scene: Path, tmp_path: Path) -> None:
    base = ["--images", str(scene), "--torch", "--model-name", "tiny", "--num-cams", "4", "--conf_percentile", "0"]
    assert _run(base + ["--out_dir", str(tmp_path / "a")]) == 0
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    poses = _poses_from(tmp_path / "a" / "cameras.json", 2.5, rot, np.array([1.0, -2.0, 0.5]))
    (tmp_path / "poses.json").write_text(json.dumps({"convention": "c2w", "poses": poses}))
    assert _run(base + ["--out-dir", str(tmp_path / "b"), "--poses", str(tmp_path / "poses.json")]) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    al = summary["alignment"]
    assert al["residual_rms"] < 1e-4 and al["scale"] == pytest.approx(2.5, rel=1e-4)
    assert set(al["residual_per_camera"]) == set(CAMS[:4])
    from vggt_trt.recon.pointcloud import read_cameras_json

    aligned = json.loads((tmp_path / "b" / "cameras.json").read_text())["cameras"]
    for cam in aligned:  # cameras are now in the rig frame
        assert np.allclose(cam["center"], np.asarray(poses[cam["image_name"][:-4]])[:3, 3], atol=1e-4)
    assert read_cameras_json(tmp_path / "b" / "cameras.json")["extrinsic"].shape == (4, 3, 4)
    # the same poses as YAML (w2c) and NPZ (names + centres) give the same fit
    import yaml

    w2c = {n: np.linalg.inv(np.asarray(m)).tolist() for n, m in poses.items()}
    (tmp_path / "poses.yaml").write_text(yaml.safe_dump({"convention": "w2c", "poses": w2c}))
    names = sorted(poses)
    np.savez(tmp_path / "poses.npz", names=np.array(names), centers=np.array([poses[n] for n in names])[:, :3, 3])
    for f in ("poses.yaml", "poses.npz"):
        out = tmp_path / f.replace(".", "_")
        assert _run(base + ["--out_dir", str(out), "--poses", str(tmp_path / f)]) == 0
        assert json.loads((out / "summary.json").read_text())["alignment"]["residual_rms"] < 1e-4


@pytest.mark.parametrize("content, message", [
    ({"poses": {"cam001": np.eye(4).tolist()}}, "no pose for cameras"),
    ({c: [[1, 2], [3, 4]] for c in CAMS}, "shape"),
    ({c: (2 * np.eye(4)).tolist() for c in CAMS}, "0, 0, 0, 1"),
    ({c: [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, 0]] for c in CAMS}, "not a proper rotation"),
    ([[0, 0, 0], [1, 0, 0]], "2 unnamed entries for 4 cameras"),
])
def test_bad_poses_fail_before_writing(scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                       content: object, message: str) -> None:
    poses = tmp_path / "poses.json"
    poses.write_text(json.dumps(content))
    out = tmp_path / "out"
    rc = _run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num_cams", "4", "--out_dir", str(out),
               "--poses", str(poses)])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unparseable_poses_and_intrinsics(scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "p.json").write_text("{not json")
    args = ["--images", str(scene), "--torch", "--model-name", "tiny", "--num_cams", "4", "--out_dir",
            str(tmp_path / "out")]
    assert _run(args + ["--poses", str(tmp_path / "p.json")]) == 2
    assert "cannot parse poses file" in capsys.readouterr().err
    assert _run(args + ["--poses", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "k.json").write_text(json.dumps({"fx": -1, "fy": 50, "cx": 40, "cy": 30}))
    assert _run(args + ["--intrinsics", str(tmp_path / "k.json")]) == 2
    assert "pinhole" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_known_intrinsics_are_mapped_to_model_pixels(scene: Path, tmp_path: Path) -> None:
    k = {"fx": 80.0, "fy": 80.0, "cx": 39.5, "cy": 29.5}  # source 80x60, principal point at the centre
    (tmp_path / "k.yaml").write_text(json.dumps({"default": k}))
    out = tmp_path / "out"
    assert _run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num_cams", "2", "--out_dir", str(out),
                 "--intrinsics", str(tmp_path / "k.yaml")]) == 0
    cam = json.loads((out / "cameras.json").read_text())["cameras"][0]
    # official crop: 80x60 -> 56x42 (scale 0.7)
    assert cam["fx"] == pytest.approx(56.0) and cam["cx"] == pytest.approx(27.5) and cam["cy"] == pytest.approx(20.5)


def test_broken_image_is_reported_and_replaced(scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    broken = scene / "cam005" / "000000.jpg"
    broken.write_bytes(b"this is not a jpeg")
    out = tmp_path / "out"
    assert _run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num_cams", "4",
                 "--out_dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scene"]["views"] == ["cam001", "cam012", "cam020", "cam024"]
    assert summary["scene"]["skipped"][0]["view"] == "cam005" and "000000.jpg" in summary["scene"]["skipped"][0]["image"]
    assert "skipped: cam005" in capsys.readouterr().out
    # all five needed, one broken: a clear error naming the image, nothing written
    out2 = tmp_path / "out2"
    assert _run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num_cams", "5",
                 "--out_dir", str(out2)]) == 2
    err = capsys.readouterr().err
    assert "only 4 readable views, 5 needed" in err and "000000.jpg" in err
    assert not out2.exists()
    # explicit views: no stand-in allowed
    assert _run(["--images", str(scene), "--torch", "--model-name", "tiny", "--views", "cam001,cam005",
                 "--out_dir", str(out2)]) == 2


def test_flat_folder_with_onnx_and_random_views(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from vggt_trt.recon.pointcloud import read_ply

    onnx_path = export_tiny(tmp_path_factory)
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        _textured(i, (64, 64)).save(flat / f"view {i}.png")  # a space: names are sanitised for COLMAP
    out = tmp_path / "out"
    assert _run(["--images", str(flat), "--onnx", str(onnx_path), "--random_views", "2", "--seed", "3",
                 "--out_dir", str(out), "--conf_threshold", "0.5", "--mask-white-bg"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["scene"]["layout"] == "flat" and len(summary["scene"]["views"]) == 2
    assert summary["input_shape"] == [2, 3, 56, 56] and summary["model"]["backend"] == "onnx"
    assert all(" " not in v for v in summary["scene"]["views"])
    assert np.isfinite(read_ply(out / "points.ply")["xyz"]).all()
    assert _run(["--images", str(flat), "--onnx", str(onnx_path), "--num_cams", "3", "--out_dir", str(out)]) == 2


def test_engine_backend_without_gpu_writes_nothing(scene: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed")
    from vggt_trt.trt.backend import cuda_device_count

    if cuda_device_count()[0]:
        pytest.skip("a GPU is present: the no-GPU error path does not apply")
    engine = tmp_path / "e.engine"
    engine.write_bytes(b"0")
    out = tmp_path / "out"
    assert _run(["--images", str(scene), "--vggt_engine", str(engine), "--out_dir", str(out)]) == 1
    assert "only on an NVIDIA GPU" in capsys.readouterr().err and not out.exists()


def test_colmap_points_are_capped_but_ply_keeps_all(scene: Path, tmp_path: Path) -> None:
    from vggt_trt.recon.pointcloud import read_ply

    out = tmp_path / "out"
    assert _run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num-cams", "4",
                 "--colmap_max_points", "50", "--out_dir", str(out)]) == 0
    lines = [ln for ln in (out / "sparse" / "0" / "points3D.txt").read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == 50
    assert read_ply(out / "points.ply")["xyz"].shape[0] > 50


@pytest.mark.parametrize("layout", ["file", "under-a-file"])
def test_unusable_out_dir_fails_before_inference(scene: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 layout: str) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder")
    out = blocker if layout == "file" else blocker / "out"
    rc = _run(["--images", str(scene), "--torch", "--model-name", "tiny", "--num_cams", "2", "--out_dir", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"--out-dir {out} is not a directory" in err, err
    assert "activated" not in err  # no model was loaded
    assert blocker.read_text() == "not a folder"
