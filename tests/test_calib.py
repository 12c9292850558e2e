"""Calibration data: every source kind, scenes, resampling, fingerprints, and the bad inputs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt_trt.quant.calib import PREPROCESS_VERSION, calibration_set, load_calibration_batches, synthetic_images
from vggt_trt.errors import InputError

H, W = 42, 56


def _save(path: Path, rgb: tuple[int, int, int], seed: int) -> Path:
    """An 84x112 image (resized by exactly 0.5 to 42x56) of one colour plus a little noise."""
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(rgb, np.float32) + rng.normal(0, 4, (84, 112, 3)), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


@pytest.fixture
def scenes(tmp_path: Path) -> Path:
    """Two scene folders told apart by colour: red (3 images) and blue (4 images)."""
    for i in range(3):
        _save(tmp_path / "data" / "red" / f"{i}.png", (220, 30, 30), i)
    for i in range(4):
        _save(tmp_path / "data" / "blue" / f"{i}.jpg", (30, 30, 220), 10 + i)
    return tmp_path / "data"


def _scene_of(view: np.ndarray) -> str:
    return "red" if view[0].mean() > view[2].mean() else "blue"


def test_directory_batches_come_from_one_scene(scenes):
    cs = calibration_set(scenes, num_cams=2, height=H, width=W, num_batches=6, seed=0)
    batches = cs.load()
    assert batches.shape == (6, 2, 3, H, W) and batches.dtype == np.float32
    assert 0.0 <= batches.min() and batches.max() <= 1.0
    for b, views in zip(batches, cs.plan):
        assert len({p.parent.name for p in views}) == 1
        assert {_scene_of(v) for v in b} == {views[0].parent.name}
    assert {v[0].parent.name for v in cs.plan} == {"red", "blue"}  # both scenes are used
    assert cs.kind == "directory" and cs.resampled  # 6 batches x 2 views > 7 images


def test_images_go_through_inference_preprocessing(scenes):
    from vggt_trt.recon.preprocess import preprocess_to_shape

    cs = calibration_set(scenes, 2, H, W, num_batches=2, seed=1)
    for batch, views in zip(cs.load(), cs.plan):
        np.testing.assert_array_equal(batch, preprocess_to_shape(views, H, W))


def test_glob_and_flat_folder(scenes):
    cs = calibration_set(str(scenes / "*" / "*.png"), 3, H, W, num_batches=1)
    assert cs.kind == "glob" and all(p.suffix == ".png" for p in cs.plan[0])
    assert not cs.resampled and sorted(p.name for p in cs.plan[0]) == ["0.png", "1.png", "2.png"]
    flat = calibration_set(scenes / "blue", 2, H, W, num_batches=2)
    assert not flat.resampled and len({p for v in flat.plan for p in v}) == 4  # no view repeated


def test_resampling_is_seeded(scenes):
    plan = lambda seed: [[p.name for p in v] for v in calibration_set(scenes, 3, H, W, 5, seed=seed).plan]  # noqa: E731
    assert plan(7) == plan(7) and plan(7) != plan(8)
    small = calibration_set(scenes / "red", 4, H, W, num_batches=2, seed=0)  # 3 images, 4 views: repeats
    assert small.resampled and all(len(v) == 4 for v in small.plan)
    assert small.load().shape == (2, 4, 3, H, W)


def test_npy_views_and_npz_batches(tmp_path):
    views = np.random.default_rng(0).random((5, 3, H, W), dtype=np.float32)
    np.save(tmp_path / "v.npy", views)
    cs = calibration_set(tmp_path / "v.npy", 2, H, W, num_batches=2, seed=0)
    batches = cs.load()
    assert cs.kind == "npy" and not cs.resampled
    for b, rows in zip(batches, cs.plan):
        np.testing.assert_array_equal(b, views[rows])
    np.savez(tmp_path / "b.npz", images=views[:4].reshape(2, 2, 3, H, W), other=np.zeros(1))
    cs = calibration_set(tmp_path / "b.npz", 2, H, W, num_batches=3, seed=0)
    assert cs.kind == "npz" and cs.resampled and cs.load().shape == (3, 2, 3, H, W)
    for b in cs.load():
        assert any(np.array_equal(b, ref) for ref in views[:4].reshape(2, 2, 3, H, W))  # whole batches kept


def test_uint8_arrays_are_scaled(tmp_path):
    arr = np.full((2, 3, H, W), 255, np.uint8)
    np.save(tmp_path / "u8.npy", arr)
    assert load_calibration_batches(tmp_path / "u8.npy", 2, H, W, num_batches=1).max() == 1.0


def test_synthetic_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="vggt_trt.quant.calib"):
        cs = calibration_set(None, 2, H, W, num_batches=3, seed=0)
    assert "ACCURACY WILL SUFFER" in caplog.text
    b = cs.load()
    assert cs.kind == "synthetic" and b.shape == (3, 2, 3, H, W) and 0 <= b.min() and b.max() <= 1
    assert b.std() > 0.05 and not np.array_equal(b[0], b[1])
    np.testing.assert_array_equal(b.reshape(-1, 3, H, W), synthetic_images(6, H, W, seed=0))


def test_fingerprint_tracks_the_data(scenes, tmp_path):
    key = lambda src, **kw: calibration_set(src, 2, H, W, num_batches=2, **kw).key()  # noqa: E731
    base = key(scenes)
    assert base == key(scenes) and base["preprocess"] == PREPROCESS_VERSION
    assert key(scenes, seed=1) != base  # sampling is part of the key
    img = scenes / "red" / "0.png"
    st = img.stat()
    _save(img, (200, 40, 40), 99)
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    modified = key(scenes)["fingerprint"]
    assert modified != base["fingerprint"]  # content, size or mtime changed
    _save(scenes / "red" / "new.png", (220, 30, 30), 5)
    assert key(scenes)["fingerprint"] not in (base["fingerprint"], modified)  # a new file
    arr = np.random.default_rng(0).random((4, 3, H, W), dtype=np.float32)
    np.save(tmp_path / "a.npy", arr)
    k1 = key(tmp_path / "a.npy")
    arr[0, 0, 0, 0] = 1.0 - arr[0, 0, 0, 0]
    np.save(tmp_path / "a.npy", arr)
    assert key(tmp_path / "a.npy")["fingerprint"] != k1["fingerprint"]
    assert key(arr)["fingerprint"] == key(tmp_path / "a.npy")["fingerprint"]  # bytes, not the path


def test_bad_sources(tmp_path, scenes):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        calibration_set(tmp_path / "empty", 2, H, W)
    with pytest.raises(InputError, match="does not exist"):
        calibration_set(tmp_path / "missing", 2, H, W)
    with pytest.raises(InputError, match="does not exist"):
        calibration_set(tmp_path / "missing.npy", 2, H, W)
    with pytest.raises(InputError, match="no images"):
        calibration_set(str(tmp_path / "empty" / "*.png"), 2, H, W)
    np.save(tmp_path / "shape.npy", np.zeros((4, 3, 28, 28), np.float32))
    with pytest.raises(InputError, match=r"expected shape \(B, 2, 3, 42, 56\) or \(N, 3, 42, 56\), "
                                         r"found \[4, 3, 28, 28\]"):
        calibration_set(tmp_path / "shape.npy", 2, H, W)
    np.save(tmp_path / "norm.npy", np.full((2, 3, H, W), -1.5, np.float32))
    with pytest.raises(InputError, match=r"in \[0, 1\].*normalises internally"):
        calibration_set(tmp_path / "norm.npy", 2, H, W)
    np.save(tmp_path / "int.npy", np.zeros((2, 3, H, W), np.int32))
    with pytest.raises(InputError, match="dtype int32"):
        calibration_set(tmp_path / "int.npy", 2, H, W)
    np.savez(tmp_path / "many.npz", a=np.zeros(1), b=np.zeros(1))
    with pytest.raises(InputError, match="name the calibration array 'images'"):
        calibration_set(tmp_path / "many.npz", 2, H, W)
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="cannot read calibration array"):
        calibration_set(tmp_path / "junk.npy", 2, H, W)
    with pytest.raises(InputError, match="multiple of 14"):
        calibration_set(scenes, 2, 40, W)
    with pytest.raises(InputError, match="num_batches"):
        calibration_set(scenes, 2, H, W, num_batches=0)


def test_unreadable_image_is_a_clear_error(scenes):
    bad = scenes / "red" / "broken.png"
    bad.write_bytes(b"\x89PNG but not really")
    cs = calibration_set(scenes / "red", 4, H, W, num_batches=1)
    with pytest.raises(InputError, match="broken.png"):
        cs.load()
