"""Calibration data for Q/DQ quantisation: image folders, globs, ``.npy``/``.npz`` arrays or synthetic.

A :class:`CalibrationSet` is planned cheaply (file listing or array header, seeded sampling) and
loaded lazily, so a cache lookup needs only its :attr:`CalibrationSet.fingerprint`:

- directory (searched recursively) or glob: images go through exactly the inference
  preprocessing (:func:`vggt_trt.recon.preprocess.preprocess_to_shape`). When the images sit in more
  than one folder, each folder is a scene and every batch takes all its views from one scene
  (VGGT's global attention sees the views of a batch together). The fingerprint covers every
  listed path with its size and modification time.
- ``.npy`` / ``.npz``: float arrays in [0, 1] (uint8 is divided by 255) shaped
  ``(B, num_cams, 3, H, W)`` (each row is one batch) or ``(N, 3, H, W)`` (views drawn from all N).
  The fingerprint is a SHA-256 of the array bytes.
- ``None``: synthetic smooth images; a loud warning says calibration accuracy will suffer.

Batches are always float32 ``(num_cams, 3, H, W)`` in [0, 1]; the model normalises internally.
When the source has fewer batches (or views) than asked for, batches are resampled with
replacement, seeded by ``seed``. Everything stays on the host (numpy); ModelOpt and TensorRT
calibrators take numpy arrays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..errors import InputError
from ..recon.preprocess import list_images, preprocess_to_shape

log = logging.getLogger(__name__)

__all__ = ["PREPROCESS_VERSION", "CalibrationSet", "calibration_set", "load_calibration_batches",
           "synthetic_images"]

# Bump when preprocess_to_shape (or how calibration arrays are interpreted) changes numerically:
# it is part of every cache key, so old calibrated graphs are not reused.
PREPROCESS_VERSION = "preprocess_to_shape-v2"
_SYNTHETIC_VERSION = "synthetic-v1"
_ARRAY_SUFFIXES = (".npy", ".npz")
_PATCH = 14


@dataclass
class CalibrationSet:
    """A planned set of calibration batches; :meth:`load` reads and preprocesses them once."""

    kind: str  # "directory" | "glob" | "npy" | "npz" | "synthetic"
    description: str
    num_cams: int
    height: int
    width: int
    num_batches: int
    seed: int
    fingerprint: str
    resampled: bool
    # per batch, per view: an image path (directory/glob) or a flat row index into the array
    plan: list[list[Any]] = field(repr=False)
    _array: np.ndarray | None = field(default=None, repr=False)
    _batches: np.ndarray | None = field(default=None, repr=False)

    @property
    def batch_shape(self) -> tuple[int, int, int, int]:
        return (self.num_cams, 3, self.height, self.width)

    def key(self) -> dict[str, Any]:
        """JSON-able identity of the data for cache keys (source fingerprint, shape, sampling)."""
        return {"kind": self.kind, "fingerprint": self.fingerprint, "batch_shape": list(self.batch_shape),
                "num_batches": self.num_batches, "seed": self.seed, "preprocess": PREPROCESS_VERSION}

    def load(self) -> np.ndarray:
        """All batches as float32 ``[num_batches, num_cams, 3, H, W]`` in [0, 1] (read once)."""
        if self._batches is None:
            self._batches = self._load()
        return self._batches

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter(self.load())

    def __len__(self) -> int:
        return self.num_batches

    def _load(self) -> np.ndarray:
        from tqdm.auto import tqdm

        if self.kind == "synthetic":
            return synthetic_images(self.num_batches * self.num_cams, self.height, self.width,
                                    self.seed).reshape((self.num_batches,) + self.batch_shape)
        out = np.empty((self.num_batches,) + self.batch_shape, dtype=np.float32)
        if self._array is not None:
            flat = self._array.reshape((-1, 3, self.height, self.width))
            for b, rows in enumerate(self.plan):
                out[b] = _to_unit_float(flat[rows], self.description)
            return out
        unique = sorted({p for views in self.plan for p in views}, key=os.fspath)
        loaded: dict[Path, np.ndarray] = {}
        for path in tqdm(unique, desc="calibration images", unit="img", leave=False):
            loaded[path] = preprocess_to_shape([path], self.height, self.width)[0]
        for b, views in enumerate(self.plan):
            out[b] = np.stack([loaded[p] for p in views])
        log.info("loaded %d calibration images (%d batches of %s) from %s",
                 len(unique), self.num_batches, list(self.batch_shape), self.description)
        return out


def synthetic_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth "real-ish" float32 images ``[n, 3, H, W]`` in [0, 1]: blocks, gradients, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, height, dtype=np.float32),
                         np.linspace(0, 1, width, dtype=np.float32), indexing="ij")
    out = np.empty((n, 3, height, width), dtype=np.float32)
    for i in range(n):
        gy, gx = rng.uniform(-0.5, 0.5, size=(2, 3, 1, 1)).astype(np.float32)
        img = rng.uniform(0.2, 0.8, size=(3, 1, 1)).astype(np.float32) + gy * yy + gx * xx
        for _ in range(int(rng.integers(2, 6))):
            y0, x0 = int(rng.integers(0, height)), int(rng.integers(0, width))
            y1 = y0 + int(rng.integers(height // 8 + 1, height // 2 + 2))
            x1 = x0 + int(rng.integers(width // 8 + 1, width // 2 + 2))
            img[:, y0:y1, x0:x1] = rng.uniform(0, 1, size=(3, 1, 1))
        img += rng.normal(0, 0.02, size=img.shape).astype(np.float32)
        out[i] = np.clip(img, 0.0, 1.0)
    return out


def calibration_set(
    source: str | os.PathLike | np.ndarray | None,
    num_cams: int,
    height: int,
    width: int,
    num_batches: int = 8,
    seed: int = 0,
    recursive: bool = True,
) -> CalibrationSet:
    """Plan ``num_batches`` calibration batches of ``(num_cams, 3, height, width)`` from ``source``.

    ``source``: a directory, a glob, an image file, a ``.npy``/``.npz`` path, an in-memory array
    (same shape rules as ``.npy``) or ``None`` for synthetic data. Raises :class:`InputError` for
    empty sources, wrong shapes (expected vs found) and unreadable files.
    """
    for name, value in (("num_cams", num_cams), ("height", height), ("width", width),
                        ("num_batches", num_batches)):
        if int(value) != value or value < 1:
            raise InputError(f"calibration {name} must be a positive integer, found {value!r}")
    for name, value in (("height", height), ("width", width)):
        if value % _PATCH:
            raise InputError(f"calibration {name} must be a multiple of {_PATCH} (the patch size), found {value}")
    rng = np.random.default_rng(seed)
    common = dict(num_cams=int(num_cams), height=int(height), width=int(width),
                  num_batches=int(num_batches), seed=int(seed))
    if source is None:
        log.warning(
            "!!! NO CALIBRATION DATA: calibrating on %d synthetic images. Activation ranges will not "
            "match real photos and quantised ACCURACY WILL SUFFER. Pass --calib-data DIR|GLOB|.npy|.npz. !!!",
            num_batches * num_cams)
        fp = _sha256({"synthetic": _SYNTHETIC_VERSION, "seed": seed})
        plan = [[None] * num_cams for _ in range(num_batches)]
        return CalibrationSet("synthetic", f"synthetic ({_SYNTHETIC_VERSION}, seed {seed})",
                              fingerprint=fp, resampled=False, plan=plan, **common)
    if isinstance(source, np.ndarray):
        return _array_set(source, "array", "in-memory array", rng, common)
    path = Path(os.fspath(source)).expanduser()
    if path.suffix.lower() in _ARRAY_SUFFIXES:
        if not path.is_file():
            raise InputError(f"calibration file does not exist: {path}")
        return _array_set(_read_array(path), path.suffix.lower()[1:], str(path), rng, common)
    return _image_set(source, rng, recursive, common)


def load_calibration_batches(
    source: str | os.PathLike | np.ndarray | None, num_cams: int, height: int, width: int,
    num_batches: int = 8, seed: int = 0,
) -> np.ndarray:
    """Shortcut: ``calibration_set(...).load()``, float32 ``[num_batches, num_cams, 3, H, W]``."""
    return calibration_set(source, num_cams, height, width, num_batches, seed).load()


# --------------------------------------------------------------------------- arrays


def _read_array(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as npz:
            keys = list(npz.files)
            if not keys:
                raise InputError(f"calibration file {path} holds no arrays")
            if len(keys) > 1 and "images" not in keys:
                raise InputError(f"calibration file {path} holds several arrays {keys}; "
                                 "name the calibration array 'images'")
            return npz["images" if "images" in keys else keys[0]]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"cannot read calibration array {path}: {exc}") from exc


def _to_unit_float(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / np.float32(255.0)
    return arr.astype(np.float32, copy=False)


def _array_set(arr: np.ndarray, kind: str, where: str, rng: np.random.Generator,
               common: dict[str, int]) -> CalibrationSet:
    num_cams, h, w, num_batches = common["num_cams"], common["height"], common["width"], common["num_batches"]
    expected = f"(B, {num_cams}, 3, {h}, {w}) or (N, 3, {h}, {w})"
    if arr.dtype != np.uint8 and arr.dtype.kind != "f":
        raise InputError(f"calibration array {where}: expected float32 in [0, 1] or uint8, found dtype {arr.dtype}")
    if arr.ndim == 5 and tuple(arr.shape[1:]) == (num_cams, 3, h, w):
        units = arr.shape[0]
        if units == 0:
            raise InputError(f"calibration array {where} is empty: shape {list(arr.shape)}")
        order, resampled = _draw(rng, units, num_batches)
        plan = [list(range(int(b) * num_cams, (int(b) + 1) * num_cams)) for b in order]
    elif arr.ndim == 4 and tuple(arr.shape[1:]) == (3, h, w):
        units = arr.shape[0]
        if units == 0:
            raise InputError(f"calibration array {where} is empty: shape {list(arr.shape)}")
        plan, resampled = _plan_views(rng, [list(range(units))], num_cams, num_batches)
    else:
        raise InputError(f"calibration array {where}: expected shape {expected}, found {list(arr.shape)}")
    if arr.dtype.kind == "f":
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if not np.isfinite(arr).all() or lo < -1e-3 or hi > 1.0 + 1e-3:
            raise InputError(
                f"calibration array {where}: values must be finite and in [0, 1] (raw images; the model "
                f"normalises internally), found range [{lo:.3g}, {hi:.3g}]")
    if resampled:
        log.warning("calibration array %s has fewer samples than %d batches x %d views; "
                    "resampling with replacement (seed %d)", where, num_batches, num_cams, common["seed"])
    digest = hashlib.sha256(np.ascontiguousarray(arr).data).hexdigest()
    fp = _sha256({"array": digest, "dtype": str(arr.dtype), "shape": list(arr.shape)})
    return CalibrationSet(kind, where, fingerprint=fp, resampled=resampled, plan=plan, _array=arr, **common)


# --------------------------------------------------------------------------- images


def _image_set(source: str | os.PathLike, rng: np.random.Generator, recursive: bool,
               common: dict[str, int]) -> CalibrationSet:
    text = os.fspath(source)
    kind = "directory" if Path(text).expanduser().is_dir() else "glob"
    paths = list_images(text, recursive=recursive)  # InputError when missing or empty
    entries = []
    for p in paths:
        try:
            st = p.stat()
        except OSError as exc:
            raise InputError(f"cannot read calibration image {p}: {exc}") from exc
        if not os.access(p, os.R_OK):
            raise InputError(f"cannot read calibration image {p}: permission denied")
        entries.append([os.fspath(p.resolve()), st.st_size, st.st_mtime_ns])
    scenes: dict[Path, list[Path]] = {}
    for p in paths:
        scenes.setdefault(p.parent, []).append(p)
    groups = [scenes[k] for k in sorted(scenes, key=os.fspath)]
    plan, resampled = _plan_views(rng, groups, common["num_cams"], common["num_batches"])
    if len(groups) > 1:
        log.info("calibration: %d images in %d scene folders; each batch draws its %d views from one scene",
                 len(paths), len(groups), common["num_cams"])
    if resampled:
        log.warning("calibration source %s has fewer images than needed (%d in %d scene(s) for %d batches "
                    "x %d views); resampling with replacement (seed %d)", text, len(paths), len(groups),
                    common["num_batches"], common["num_cams"], common["seed"])
    fp = _sha256({"files": entries})
    return CalibrationSet(kind, f"{kind} {text}", fingerprint=fp, resampled=resampled, plan=plan, **common)


def _draw(rng: np.random.Generator, units: int, count: int) -> tuple[np.ndarray, bool]:
    """``count`` distinct indices from ``range(units)`` when possible, else with replacement."""
    if units >= count:
        return rng.permutation(units)[:count], False
    return np.concatenate([rng.permutation(units), rng.integers(0, units, count - units)]), True


def _plan_views(rng: np.random.Generator, groups: Sequence[Sequence[Any]], num_cams: int,
                num_batches: int) -> tuple[list[list[Any]], bool]:
    """Per batch, ``num_cams`` items from one group (groups taken round-robin in a seeded order).

    Each group is a shuffled pool consumed without replacement; only when a pool runs dry is it
    reshuffled (resampling), and a group smaller than ``num_cams`` repeats views in a batch.
    """
    order = rng.permutation(len(groups))
    pools: dict[int, list[int]] = {}
    plan: list[list[Any]] = []
    resampled = False
    for b in range(num_batches):
        g = int(order[b % len(groups)])
        group = groups[g]
        if len(group) < num_cams:
            idx, _ = _draw(rng, len(group), num_cams)
            plan.append([group[int(i)] for i in idx])
            resampled = True
            continue
        pool = pools.setdefault(g, [])
        if len(pool) < num_cams:
            resampled |= b >= len(groups)  # a refill after the first pass re-uses views
            pool.extend(int(i) for i in rng.permutation(len(group)) if int(i) not in pool)
        take, pools[g] = pool[:num_cams], pool[num_cams:]
        plan.append([group[i] for i in sorted(take)])
    return plan, resampled


def _sha256(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()
