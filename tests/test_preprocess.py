"""Preprocessing: official crop/pad behaviour, RGBA, fixed shapes, listing, and clear errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vggt_trt.errors import InputError
from vggt_trt.recon.preprocess import (
    list_images,
    load_and_preprocess_images,
    official_resize_hw,
    preprocess_to_shape,
    readable_images,
)


def make_image(path: Path, w: int, h: int, seed: int = 0, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    rgb = (rgb + rng.integers(0, 20, size=rgb.shape)).clip(0, 255).astype(np.uint8)
    if mode == "RGBA":
        alpha = np.full((h, w, 1), 255, np.uint8)
        alpha[:, : w // 3] = 0  # fully transparent band
        alpha[:, w // 3: 2 * w // 3] = 100  # half transparent band
        Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA").save(path)
    else:
        Image.fromarray(rgb, "RGB").save(path)
    return path


def reference_loader(paths, mode="crop", target_size=518):
    """The official ``load_and_preprocess_images`` steps, transcribed with torch as upstream does it."""
    images = []
    for p in paths:
        img = Image.open(p)
        if img.mode == "RGBA":
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
        img = img.convert("RGB")
        width, height = img.size
        if mode == "pad" and width < height:
            new_h, new_w = target_size, round(width * (target_size / height) / 14) * 14
        else:
            new_w, new_h = target_size, round(height * (target_size / width) / 14) * 14
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        t = torch.from_numpy(np.array(img)).permute(2, 0, 1).float().div(255)
        if mode == "crop" and new_h > target_size:
            start = (new_h - target_size) // 2
            t = t[:, start:start + target_size, :]
        if mode == "pad":
            hp, wp = target_size - t.shape[1], target_size - t.shape[2]
            t = F.pad(t, (wp // 2, wp - wp // 2, hp // 2, hp - hp // 2), value=1.0)
        images.append(t)
    max_h = max(t.shape[1] for t in images)
    max_w = max(t.shape[2] for t in images)
    out = []
    for t in images:
        hp, wp = max_h - t.shape[1], max_w - t.shape[2]
        out.append(F.pad(t, (wp // 2, wp - wp // 2, hp // 2, hp - hp // 2), value=1.0))
    return torch.stack(out).numpy()


@pytest.fixture()
def scene(tmp_path):
    d = tmp_path / "scene"
    (d / "sub").mkdir(parents=True)
    paths = {
        "land": make_image(d / "a_land.jpg", 640, 480, 1),
        "port": make_image(d / "b_port.png", 480, 640, 2),
        "rgba": make_image(d / "c_rgba.png", 280, 224, 3, mode="RGBA"),
        "tiny": make_image(d / "sub" / "d_tiny.PNG", 700, 560, 4),
    }
    (d / "notes.txt").write_text("not an image")
    make_image(d / ".hidden.png", 20, 20)
    return d, paths


def test_list_images_dir_glob_and_sorting(scene):
    d, p = scene
    assert list_images(d) == sorted([p["land"], p["port"], p["rgba"], p["tiny"]])
    assert list_images(d, recursive=False) == [p["land"], p["port"], p["rgba"]]
    assert list_images(str(d / "*.png")) == [p["port"], p["rgba"]]
    assert list_images(str(d / "**" / "*.PNG")) == [p["tiny"]]
    assert list_images(p["land"]) == [p["land"]]


def test_list_images_errors_name_the_path(tmp_path):
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    (empty / "readme.md").write_text("x")
    with pytest.raises(InputError, match="empty_dir"):
        list_images(empty)
    with pytest.raises(InputError, match="no_such"):
        list_images(tmp_path / "no_such")
    with pytest.raises(InputError, match=r"\*\.jpg"):
        list_images(str(tmp_path / "*.jpg"))


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_matches_official_loader_exactly(scene, mode):
    _, p = scene
    for group in ([p["land"]], [p["land"], p["tiny"]], [p["land"], p["port"], p["rgba"]]):
        ours = load_and_preprocess_images(group, mode=mode)
        ref = reference_loader(group, mode=mode)
        assert ours.dtype == np.float32 and ours.shape == ref.shape
        np.testing.assert_array_equal(ours, ref)


def test_crop_and_pad_shapes(scene):
    _, p = scene
    assert load_and_preprocess_images([p["land"]]).shape == (1, 3, 392, 518)
    assert official_resize_hw(480, 640, "crop") == (686, 518)
    port = load_and_preprocess_images([p["port"]])  # 686 rows, centre-cropped to 518
    assert port.shape == (1, 3, 518, 518)
    pad = load_and_preprocess_images([p["land"]], mode="pad")
    assert pad.shape == (1, 3, 518, 518)
    assert (pad[0, :, :63] == 1.0).all() and (pad[0, :, -63:] == 1.0).all()  # (518-392)/2 white rows
    assert (pad[0, :, 63:-63] < 1.0).any()
    padp = load_and_preprocess_images([p["port"]], mode="pad")
    assert (padp[0, :, :, :63] == 1.0).all() and padp.shape == (1, 3, 518, 518)
    assert 0.0 <= pad.min() and pad.max() <= 1.0


def test_mixed_shapes_pad_white_with_warning(scene, caplog):
    _, p = scene
    with caplog.at_level(logging.WARNING, logger="vggt_trt.recon.preprocess"):
        out = load_and_preprocess_images([p["land"], p["port"]])
    assert out.shape == (2, 3, 518, 518)
    assert "different shapes" in caplog.text
    assert (out[0, :, :63] == 1.0).all()  # the 392-row image is centred in white


def test_rgba_composited_on_white(scene):
    _, p = scene
    # 280x224 at target 280 is not resampled, so the output is exactly the composite / 255
    out = load_and_preprocess_images([p["rgba"]], target_size=280)
    assert out.shape == (1, 3, 224, 280)
    src = np.asarray(Image.open(p["rgba"]), dtype=np.float64) / 255
    blended = src[..., :3] * src[..., 3:] + (1 - src[..., 3:])
    np.testing.assert_allclose(out[0].transpose(1, 2, 0), blended, atol=1 / 255 + 1e-6)
    assert (out[0, :, :, : 280 // 3] == 1.0).all()  # fully transparent band -> exactly white
    half = out[0, :, :, 280 // 3: 2 * 280 // 3]
    raw = src[:, 280 // 3: 2 * 280 // 3, :3].transpose(2, 0, 1)
    assert (half >= raw - 1e-6).all() and (half > raw + 0.1).mean() > 0.5  # lighter than raw


def test_target_size_tiny_shape(scene):
    _, p = scene
    out = load_and_preprocess_images([p["tiny"], p["tiny"]], target_size=70)
    assert out.shape == (2, 3, 56, 70)
    np.testing.assert_array_equal(out, reference_loader([p["tiny"]] * 2, target_size=70))


def test_sizes_not_multiple_of_14(scene):
    _, p = scene
    with pytest.raises(InputError, match=r"multiple of 14.*found 500"):
        load_and_preprocess_images([p["land"]], target_size=500)
    with pytest.raises(InputError, match=r"height.*multiple of 14.*found 50"):
        preprocess_to_shape([p["land"]], 50, 70)
    with pytest.raises(InputError, match=r"width.*found 71"):
        preprocess_to_shape([p["land"]], 56, 71)


def test_unreadable_files_are_named(tmp_path, scene):
    _, p = scene
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(p["port"].read_bytes()[:400])
    for path in (bad, truncated):
        with pytest.raises(InputError, match=path.name):
            load_and_preprocess_images([p["land"], path])
    with pytest.raises(InputError, match="missing.png"):
        load_and_preprocess_images([tmp_path / "missing.png"])
    with pytest.raises(InputError, match="at least 1"):
        load_and_preprocess_images([])
    ok, failed = readable_images([p["land"], bad, truncated])
    assert ok == [p["land"]] and [f for f, _ in failed] == [bad, truncated]


def test_preprocess_to_shape_cover_and_centre_crop(tmp_path, scene):
    _, p = scene
    same_aspect = preprocess_to_shape([p["tiny"]], 56, 70)
    plain = np.asarray(Image.open(p["tiny"]).resize((70, 56), Image.Resampling.BICUBIC), np.float32) / 255
    np.testing.assert_allclose(same_aspect[0].transpose(1, 2, 0), plain, atol=1e-6)
    # wide image: red | green | blue; scale 0.1 -> source box x in [350, 1050): all green
    wide = np.zeros((560, 1400, 3), np.uint8)
    wide[:, :300, 0] = 255
    wide[:, 300:1100, 1] = 255
    wide[:, 1100:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = preprocess_to_shape([tmp_path / "wide.png", p["port"]], 56, 70)
    assert out.shape == (2, 3, 56, 70) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[0, [0, 2]], 0.0, atol=1e-6)
    # tall image: cover by width, crop rows symmetrically
    tall = np.zeros((1000, 100, 3), np.uint8)
    tall[:500] = 255
    Image.fromarray(tall).save(tmp_path / "tall.png")
    t = preprocess_to_shape([tmp_path / "tall.png"], 14, 28)[0, 0]
    assert t[:5].min() > 0.99 and t[-5:].max() < 0.01  # source row 500 (the edge) maps to the centre
