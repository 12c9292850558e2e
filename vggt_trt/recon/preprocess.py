"""Image loading and preprocessing identical to the official VGGT loader, plus fixed-shape variants.

:func:`load_and_preprocess_images` reproduces ``vggt/utils/load_fn.py``
``load_and_preprocess_images`` (facebookresearch/vggt at commit 44b3afbd): RGBA composited on
white, ``convert("RGB")``, PIL bicubic resize, ``/255`` to float32, then

- ``crop``: width = ``target_size``, height = ``round(h * target_size / w / 14) * 14``, centre crop
  of the height when it exceeds ``target_size``;
- ``pad``: the longer side = ``target_size``, the other rounded to a multiple of 14, padded with
  white (1.0) to ``target_size x target_size``, centred.

Images of different shapes in one batch (crop mode with mixed aspect ratios) are padded with white
to the largest height and width, centred, as the reference does (with a logged warning instead of a
print). ``target_size`` (default 518, the reference's fixed value) must be a multiple of 14.

Deliberate differences: the result is a numpy array (``torch.from_numpy`` gives the reference's
tensor without a copy); images with alpha in other modes (``LA``, ``PA``, palette with a
transparency key) are composited on white too, where the reference only does so for ``RGBA``;
EXIF orientation is ignored by default, as in the reference (``exif_transpose=True`` applies it).
Every image is read by :func:`load_image`, which also converts 16-bit and float images to 8 bits
(the reference would turn a 16-bit PNG white) and refuses modes it cannot convert.

:func:`preprocess_to_shape` serves engines with a fixed input shape: each image is scaled to
cover ``height x width`` keeping its aspect ratio and centre-cropped to it, in one PIL bicubic
resample of the centred source box (no second rounding step).
"""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path
from typing import Iterable, Literal, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "PATCH_SIZE",
    "list_images",
    "load_image",
    "readable_images",
    "official_resize_hw",
    "load_and_preprocess_images",
    "preprocess_to_shape",
]

PATCH_SIZE = 14
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_GLOB_CHARS = set("*?[")
_READ_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError)

PathLike = str | os.PathLike


def _check_multiple_of_14(name: str, value: int) -> int:
    if int(value) != value or value <= 0 or int(value) % PATCH_SIZE:
        raise InputError(
            f"{name} must be a positive multiple of {PATCH_SIZE} (the patch size), found {value}"
            f" (nearest valid: {max(PATCH_SIZE, round(value / PATCH_SIZE) * PATCH_SIZE)})"
        )
    return int(value)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def list_images(dir_or_glob: PathLike, recursive: bool = True) -> list[Path]:
    """Sorted image files under a folder (recursively by default), matching a glob, or one file.

    Extensions (case-insensitive): jpg, jpeg, png, bmp, tif, tiff, webp. Hidden files (names
    starting with ``.``, e.g. macOS ``._x.jpg`` or our own temporary files) are skipped.
    """
    text = os.fspath(dir_or_glob)
    path = Path(text).expanduser()
    if path.is_dir():
        candidates: Iterable[Path] = path.rglob("*") if recursive else path.iterdir()
        found = [p for p in candidates if p.is_file() and _is_image(p)
                 and not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])]
        where = f"folder {path}" + (" (searched recursively)" if recursive else "")
    elif path.is_file():
        if not _is_image(path):
            raise InputError(
                f"{path} is not an image file (expected one of {', '.join(IMAGE_EXTENSIONS)})"
            )
        found = [path]
        where = str(path)
    elif _GLOB_CHARS & set(text):
        found = [Path(p) for p in glob.glob(os.path.expanduser(text), recursive=recursive)
                 if Path(p).is_file() and _is_image(Path(p))]
        where = f"glob {text!r}"
    else:
        raise InputError(f"image path does not exist: {path}")
    if not found:
        raise InputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {where}")
    return sorted(found, key=lambda p: os.fspath(p))


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_KEYED_MODES = ("P", "L", "RGB")
_EIGHT_BIT_MODES = ("1", "L", "P", "RGB", "RGBA", "LA", "PA", "RGBa", "La", "RGBX", "CMYK", "YCbCr")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ACCEPTED = ("8-bit L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, 1-bit; 16-bit grayscale (I;16, I;16B, I with values "
             "0..65535); 16-bit RGB/RGBA PNG; float (F) with values in [0, 1]")


def _refuse(path: Path, mode: str, why: str) -> InputError:
    return InputError(f"cannot use image {path}: mode {mode} {why}; accepted: {_ACCEPTED}")


def _wide_to_8bit(img: Image.Image, path: Path) -> Image.Image:
    """A 16-bit (``I;16*``, ``I``) or float (``F``) grayscale image as 8-bit ``L`` (``LA`` with a tRNS key)."""
    values = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise _refuse(path, img.mode, f"has values outside [0, 1] (found {values.min():g}..{values.max():g})")
        scale = 255.0
    else:
        if values.min() < 0 or values.max() > 65535:
            raise _refuse(path, img.mode, f"has values outside 0..65535 (found {values.min():g}..{values.max():g})")
        scale = 255.0 / 65535.0
    gray = Image.fromarray(np.rint(values * scale).astype(np.uint8), "L")
    key = img.info.get("transparency")
    if isinstance(key, int) and img.mode != "F":
        alpha = Image.fromarray(np.where(values == key, 0, 255).astype(np.uint8), "L")
        return Image.merge("LA", (gray, alpha))
    return gray


def _to_rgb(img: Image.Image, path: Path) -> Image.Image:
    if img.mode in _SIXTEEN_BIT_MODES or img.mode == "F":
        img = _wide_to_8bit(img, path)
    elif img.mode not in _EIGHT_BIT_MODES:
        raise _refuse(path, img.mode, "is not supported")
    has_alpha = img.mode in _ALPHA_MODES or (img.mode in _KEYED_MODES and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_image(path: PathLike, exif_transpose: bool = False) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB: the one image reader of the package.

    - 8-bit modes (L, P, RGB, RGBA, LA, PA, CMYK, YCbCr, 1-bit) convert as PIL does;
    - 16-bit grayscale (``I;16``, ``I;16B``, ``I`` with values 0..65535) scales to 8 bits
      (``round(v * 255 / 65535)``); 16-bit RGB/RGBA PNGs, which Pillow decodes to their high bytes,
      come out within one level of the same scaling;
    - float (``F``, e.g. a float TIFF) must hold values in [0, 1] and scales by 255;
    - any other mode, or values outside those ranges, raise :class:`InputError` naming the file, its
      mode and what is accepted.

    Alpha (an alpha channel or a tRNS transparency key) is composited on white, as the reference VGGT
    loader does, then dropped.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            return _to_rgb(img, path)
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"image file not found: {path}") from exc
    except _READ_ERRORS as exc:
        raise InputError(f"cannot read image {path}: {exc}") from exc


def readable_images(paths: Sequence[PathLike]) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Split ``paths`` into decodable images and ``(path, reason)`` pairs (decodes each once)."""
    ok: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for p in paths:
        try:
            load_image(p)
        except InputError as exc:
            log.warning("skipping unreadable image: %s", exc)
            bad.append((Path(p), str(exc)))
        else:
            ok.append(Path(p))
    return ok, bad


def official_resize_hw(
    width: int, height: int, mode: Literal["crop", "pad"] = "crop", target_size: int = 518
) -> tuple[int, int]:
    """The (height, width) the reference resizes an image of ``width x height`` to, before crop/pad."""
    if mode == "pad" and width < height:
        new_h = target_size
        new_w = round(width * (new_h / height) / PATCH_SIZE) * PATCH_SIZE
    else:
        new_w = target_size
        new_h = round(height * (new_w / width) / PATCH_SIZE) * PATCH_SIZE
    return new_h, new_w


def _to_chw(img: Image.Image) -> np.ndarray:
    """PIL RGB image to float32 ``[3, H, W]`` in [0, 1] (as torchvision ``ToTensor``)."""
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1)).astype(np.float32) / np.float32(255.0)


def _pad_white(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    """Centre ``arr [3, h, w]`` in a white ``[3, height, width]`` canvas (extra pixel bottom/right)."""
    h_pad, w_pad = height - arr.shape[1], width - arr.shape[2]
    if h_pad <= 0 and w_pad <= 0:
        return arr
    top, left = h_pad // 2, w_pad // 2
    return np.pad(arr, ((0, 0), (top, h_pad - top), (left, w_pad - left)), constant_values=1.0)


def load_and_preprocess_images(
    paths: Sequence[PathLike],
    mode: Literal["crop", "pad"] = "crop",
    target_size: int = 518,
    exif_transpose: bool = False,
) -> np.ndarray:
    """Load images as the official VGGT loader does: float32 ``[S, 3, H, W]`` in [0, 1]."""
    if len(paths) == 0:
        raise InputError("at least 1 image is required, got an empty list")
    if mode not in ("crop", "pad"):
        raise InputError(f"mode must be 'crop' or 'pad', found {mode!r}")
    target_size = _check_multiple_of_14("target_size", target_size)
    images: list[np.ndarray] = []
    for path in paths:
        img = load_image(path, exif_transpose=exif_transpose)
        width, height = img.size
        new_h, new_w = official_resize_hw(width, height, mode, target_size)
        if new_h <= 0 or new_w <= 0:
            raise InputError(
                f"image {path} ({width}x{height}) is too elongated for {mode} mode at "
                f"target size {target_size}: it would resize to {new_w}x{new_h}"
            )
        arr = _to_chw(img.resize((new_w, new_h), Image.Resampling.BICUBIC))
        if mode == "crop" and new_h > target_size:
            start = (new_h - target_size) // 2
            arr = arr[:, start:start + target_size, :]
        if mode == "pad":
            arr = _pad_white(arr, target_size, target_size)
        images.append(arr)
    shapes = {a.shape[1:] for a in images}
    if len(shapes) > 1:
        max_h = max(s[0] for s in shapes)
        max_w = max(s[1] for s in shapes)
        log.warning("images have different shapes %s; padding with white to %dx%d (HxW)",
                    sorted(shapes), max_h, max_w)
        images = [_pad_white(a, max_h, max_w) for a in images]
    batch = np.stack(images)
    log.debug("preprocessed %d images (%s mode) to %s", len(images), mode, batch.shape)
    return batch


def preprocess_to_shape(
    paths: Sequence[PathLike], height: int, width: int, exif_transpose: bool = False
) -> np.ndarray:
    """Images scaled to cover ``height x width`` and centre-cropped: float32 ``[S, 3, height, width]``.

    For engines with a fixed input shape. The crop box is the largest centred region of the source
    with the target aspect ratio (sub-pixel, in source coordinates), resampled once with PIL
    bicubic; an image that already has the target aspect is resized whole.
    """
    if len(paths) == 0:
        raise InputError("at least 1 image is required, got an empty list")
    height = _check_multiple_of_14("height", height)
    width = _check_multiple_of_14("width", width)
    out = np.empty((len(paths), 3, height, width), dtype=np.float32)
    for i, path in enumerate(paths):
        img = load_image(path, exif_transpose=exif_transpose)
        src_w, src_h = img.size
        scale = max(width / src_w, height / src_h)
        box_w, box_h = width / scale, height / scale
        left, top = (src_w - box_w) / 2.0, (src_h - box_h) / 2.0
        resized = img.resize((width, height), Image.Resampling.BICUBIC,
                             box=(left, top, left + box_w, top + box_h))
        out[i] = _to_chw(resized)
    log.debug("preprocessed %d images to fixed shape %dx%d", len(paths), height, width)
    return out
