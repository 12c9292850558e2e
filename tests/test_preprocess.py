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
    load_image,
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


# --------------------------------------------------------------------------- bit depths and modes

def _gradient16(h: int = 6, w: int = 64) -> np.ndarray:
    """A 16-bit ramp over the full range, off the multiples of 257 so that scaling must round."""
    return np.linspace(0, 65535, h * w).round().astype(np.uint16).reshape(h, w)


def _eight(values16: np.ndarray) -> np.ndarray:
    return np.rint(values16.astype(np.float64) * 255 / 65535).astype(np.uint8)


def _png16_rgb(path: Path, rgb: np.ndarray) -> None:
    """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
    import struct
    import zlib

    h, w, _ = rgb.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))


def _write(kind: str, path: Path) -> tuple[Path, np.ndarray]:
    """Write a synthetic image of ``kind``; returns its path and the expected 8-bit RGB."""
    g8 = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (6, 1))
    rgb8 = np.stack([g8, 255 - g8, g8 // 2], -1)
    g16 = _gradient16()
    if kind == "L":
        Image.fromarray(g8, "L").save(path)
        return path, np.repeat(g8[..., None], 3, -1)
    if kind == "RGB":
        Image.fromarray(rgb8, "RGB").save(path)
        return path, rgb8
    if kind == "RGBA":
        Image.fromarray(np.concatenate([rgb8, np.full((6, 64, 1), 255, np.uint8)], -1), "RGBA").save(path)
        return path, rgb8
    if kind == "LA":
        Image.merge("LA", (Image.fromarray(g8), Image.new("L", (64, 6), 255))).save(path)
        return path, np.repeat(g8[..., None], 3, -1)
    if kind == "P":
        Image.fromarray(rgb8, "RGB").quantize(256).save(path)
        with Image.open(path) as img:
            return path, np.asarray(img.convert("RGB"))
    if kind == "I;16":
        Image.fromarray(g16).save(path)
        return path, np.repeat(_eight(g16)[..., None], 3, -1)
    if kind == "I;16B":
        Image.frombytes("I;16B", (64, 6), g16.astype(">u2").tobytes()).save(path)
        return path, np.repeat(_eight(g16)[..., None], 3, -1)
    if kind == "I":
        Image.fromarray(g16.astype(np.int32)).save(path)
        return path, np.repeat(_eight(g16)[..., None], 3, -1)
    if kind == "RGB16":
        rgb16 = np.stack([g16, 65535 - g16, g16 // 2], -1)
        _png16_rgb(path, rgb16)
        return path, _eight(rgb16)
    if kind == "F":
        f = (g16 / 65535.0).astype(np.float32)
        Image.fromarray(f, "F").save(path)
        return path, np.repeat(np.rint(f.astype(np.float64) * 255).astype(np.uint8)[..., None], 3, -1)
    raise AssertionError(kind)


KINDS = [("L", "png", "L"), ("RGB", "png", "RGB"), ("RGBA", "png", "RGBA"), ("LA", "png", "LA"),
         ("P", "png", "P"), ("I;16", "png", "I;16"), ("I;16B", "tif", "I;16B"), ("I", "tif", "I"),
         ("RGB16", "png", "RGB"), ("F", "tif", "F")]


@pytest.mark.parametrize("kind,ext,pil_mode", KINDS, ids=[k[0] for k in KINDS])
def test_load_image_every_depth_and_mode(tmp_path, kind, ext, pil_mode):
    path, want = _write(kind, tmp_path / f"img.{ext}")
    with Image.open(path) as img:
        assert img.mode == pil_mode  # the case really exercises that PIL mode
    got = np.asarray(load_image(path))
    assert got.dtype == np.uint8 and got.shape == want.shape
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    assert got.min() < 50 and not (got == 255).all()


@pytest.mark.parametrize("kind", ["L", "RGB", "RGBA", "LA", "P"])
def test_load_image_8bit_unchanged(tmp_path, kind):
    path, _ = _write(kind, tmp_path / "img.png")
    with Image.open(path) as img:
        img.load()
        if img.mode in ("RGBA", "LA"):
            img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
        want = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.asarray(load_image(path)), want)


def test_16bit_transparency_key_composited_on_white(tmp_path):
    g16 = _gradient16()
    img = Image.fromarray(g16)
    img.info["transparency"] = int(g16[0, 0])
    img.save(tmp_path / "key.png", transparency=int(g16[0, 0]))
    got = np.asarray(load_image(tmp_path / "key.png"))
    assert (got[0, 0] == 255).all() and np.abs(got[0, 1].astype(int) - int(_eight(g16)[0, 1])).max() <= 1


REFUSED = [
    ("F", lambda p: Image.fromarray(np.full((4, 4), 1000.0, np.float32), "F").save(p), "outside [0, 1]"),
    ("I", lambda p: Image.fromarray(np.full((4, 4), -5, np.int32)).save(p), "outside 0..65535"),
    ("LAB", lambda p: Image.new("LAB", (4, 4)).save(p), "not supported"),
]


@pytest.mark.parametrize("mode,write,why", REFUSED, ids=[r[0] for r in REFUSED])
def test_unusable_modes_refused_by_name(tmp_path, mode, write, why):
    path = tmp_path / f"odd_{mode}.tif"
    write(path)
    with pytest.raises(InputError, match="odd_") as err:
        load_image(path)
    text = str(err.value)
    assert f"mode {mode}" in text and why in text and "accepted" in text
    ok, bad = readable_images([path])
    assert not ok and bad[0][0] == path


def test_every_reader_sees_16bit_gradient(tmp_path):
    """Model inputs, calibration/fixed-shape inputs, live image folders and viewer thumbnails: one reader."""
    from vggt_trt.pipelines.sources import ImageFolderCapture
    from vggt_trt.view.scene import thumbnail

    path, want = _write("I;16", tmp_path / "g16.png")
    fixed = preprocess_to_shape([path], 14, 56)[0]
    assert fixed.min() < 0.2 and fixed.max() > 0.8
    official = load_and_preprocess_images([path], target_size=126)[0]
    assert official.min() < 0.2 and not (official == 1.0).all()
    ok, bgr = ImageFolderCapture([path]).read()
    assert ok and np.abs(bgr[..., ::-1].astype(int) - want.astype(int)).max() <= 1
    assert np.abs(thumbnail(path).astype(int) - want.astype(int)).max() <= 1


# --------------------------------------------------------------------------- exact values (issue 19)

EXTENSIONS_TEXT = ".jpg, .jpeg, .png, .bmp, .tif, .tiff, .webp"


def _square_with_orientation(path: Path, orientation: int) -> np.ndarray:
    """A 28x28 RGB PNG (no resampling at target 28) carrying an EXIF orientation tag; returns its pixels."""
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, size=(28, 28, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb, "RGB").save(path, exif=exif)
    return rgb


def test_exif_orientation_applied_only_when_asked(tmp_path):
    path = tmp_path / "rotated.png"
    raw = _square_with_orientation(path, 6)  # 6: the camera was turned, display rotated 90 deg clockwise
    clockwise = np.ascontiguousarray(np.rot90(raw, k=-1))  # new[i, j] = raw[27 - j, i]
    assert clockwise[0, 0].tolist() == raw[27, 0].tolist()
    want_raw = raw.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    want_rot = clockwise.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(load_and_preprocess_images([path], target_size=28)[0], want_raw)
    np.testing.assert_array_equal(load_and_preprocess_images([path], target_size=28, exif_transpose=True)[0],
                                  want_rot)
    np.testing.assert_array_equal(load_and_preprocess_images([path], "pad", 28, exif_transpose=True)[0], want_rot)
    np.testing.assert_array_equal(preprocess_to_shape([path], 28, 28)[0], want_raw)
    np.testing.assert_array_equal(preprocess_to_shape([path], 28, 28, exif_transpose=True)[0], want_rot)
    np.testing.assert_array_equal(np.asarray(load_image(path)), raw)
    np.testing.assert_array_equal(np.asarray(load_image(path, exif_transpose=True)), clockwise)


def test_crop_values_are_the_centre_rows_of_the_unresampled_image(tmp_path):
    # 28 wide x 56 tall at target 28: resized to 28x56 (no resampling), centre crop keeps rows 14..41
    rgb = np.random.default_rng(3).integers(0, 256, size=(56, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "tall.png")
    out = load_and_preprocess_images([tmp_path / "tall.png"], target_size=28)
    assert out.shape == (1, 3, 28, 28)
    np.testing.assert_array_equal(out[0], rgb[14:42].transpose(2, 0, 1).astype(np.float32) / np.float32(255))


def test_pad_values_centre_the_image_in_white(tmp_path):
    # 28 wide x 14 tall at target 28, pad mode: 7 white rows above, 7 below, image rows in 7..20
    rgb = np.random.default_rng(4).integers(0, 200, size=(14, 28, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "wide.png")
    out = load_and_preprocess_images([tmp_path / "wide.png"], mode="pad", target_size=28)[0]
    assert out.shape == (3, 28, 28)
    want = np.ones((3, 28, 28), np.float32)
    want[:, 7:21] = rgb.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(out, want)
    # portrait (14 wide x 28 tall): 7 white columns left and right
    Image.fromarray(rgb.transpose(1, 0, 2).copy()).save(tmp_path / "port.png")
    outp = load_and_preprocess_images([tmp_path / "port.png"], mode="pad", target_size=28)[0]
    wantp = np.ones((3, 28, 28), np.float32)
    wantp[:, :, 7:21] = rgb.transpose(2, 1, 0).astype(np.float32) / np.float32(255)
    np.testing.assert_array_equal(outp, wantp)


def test_too_elongated_image_is_refused_with_its_size(tmp_path):
    Image.fromarray(np.zeros((5, 1000, 3), np.uint8)).save(tmp_path / "strip.png")  # resizes to 14x0
    with pytest.raises(InputError, match=r"strip\.png \(1000x5\) is too elongated for crop mode at target "
                                         r"size 14: it would resize to 14x0"):
        load_and_preprocess_images([tmp_path / "strip.png"], target_size=14)


def test_size_errors_name_the_argument_and_the_nearest_valid_value(scene):
    _, p = scene
    with pytest.raises(InputError, match=r"^target_size must be a positive multiple of 14 \(the patch size\), "
                                         r"found 500 \(nearest valid: 504\)$"):
        load_and_preprocess_images([p["land"]], target_size=500)
    with pytest.raises(InputError, match=r"^height must be a positive multiple of 14 \(the patch size\), "
                                         r"found 50 \(nearest valid: 56\)$"):
        preprocess_to_shape([p["land"]], 50, 70)
    with pytest.raises(InputError, match=r"^width must be a positive multiple of 14 \(the patch size\), "
                                         r"found 71 \(nearest valid: 70\)$"):
        preprocess_to_shape([p["land"]], 56, 71)
    with pytest.raises(InputError, match=r"^at least 1 image is required, got an empty list$"):
        load_and_preprocess_images([])
    with pytest.raises(InputError, match=r"^at least 1 image is required, got an empty list$"):
        preprocess_to_shape([], 14, 14)
    with pytest.raises(InputError, match=r"^mode must be 'crop' or 'pad', found 'fill'$"):
        load_and_preprocess_images([p["land"]], mode="fill")


def test_list_images_skips_hidden_folders_and_names_what_it_searched(scene):
    d, p = scene
    for hidden in (d / ".cache" / "x.png", d / "sub" / ".thumbs" / "y.png"):
        hidden.parent.mkdir(parents=True)
        make_image(hidden, 8, 8)
    assert list_images(d) == sorted([p["land"], p["port"], p["rgba"], p["tiny"]])
    empty = d / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=rf"^no images \({EXTENSIONS_TEXT}\) found in folder .*empty$"):
        list_images(empty, recursive=False)
    with pytest.raises(InputError, match=rf"^no images \({EXTENSIONS_TEXT}\) found in folder .*empty "
                                         r"\(searched recursively\)$"):
        list_images(empty)
    with pytest.raises(InputError, match=rf"notes\.txt is not an image file \(expected one of {EXTENSIONS_TEXT}\)$"):
        list_images(d / "notes.txt")


def test_log_messages(scene, tmp_path, caplog):
    _, p = scene
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    with caplog.at_level(logging.DEBUG, logger="vggt_trt.recon.preprocess"):
        load_and_preprocess_images([p["land"], p["land"]])
        preprocess_to_shape([p["land"]], 56, 70)
        readable_images([bad])
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == ["preprocessed 2 images (crop mode) to (2, 3, 392, 518)",
                            "preprocessed 1 images to fixed shape 56x70"]  # same shapes: no padding warning
    assert len(messages) == 3 and messages[2].startswith(f"skipping unreadable image: cannot read image {bad}:")
