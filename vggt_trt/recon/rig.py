"""Multi-view inputs of a camera rig: scene folders (PKU-style or flat), view selection, known poses and intrinsics.

Scene layouts: PKU-style, one sub-folder per camera (``cam001/``, ``cam005/`` ...) holding that camera's
frames in name order; or a flat folder (or glob) of images, each image one view of a single frame.

Poses and intrinsics files (``.json``, ``.yaml``/``.yml``, ``.npz``) name cameras as the scene does
(sub-folder names, or image stems for a flat folder). Accepted shapes:

- a mapping ``{name: value}``, optionally under a ``poses`` / ``cameras`` / ``intrinsics`` key, with
  optional top-level ``convention`` (poses: ``c2w`` camera-to-world, the default, or ``w2c``);
- ``names`` plus an array of values in the same order (JSON/YAML lists or NPZ arrays);
- an array of values without names, matched to the selected cameras in order (counts must agree).

A pose is a 4x4 or 3x4 matrix, ``{"R": 3x3, "t": 3}``, ``{"c2w"|"w2c": matrix}`` or a camera centre
(``[x, y, z]`` or ``{"center": [x, y, z]}``); only camera centres are needed to align VGGT's frame.
Intrinsics are a 3x3 K or ``{fx, fy, cx, cy}`` in source-image pixels, OpenCV convention; one K for all
cameras may be given alone or under ``K`` / ``default``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError, MissingDependencyError
from .preprocess import IMAGE_EXTENSIONS, list_images

logger = logging.getLogger(__name__)

_META_KEYS = {"convention", "units", "unit", "names", "frame", "comment", "description"}


@dataclass
class Scene:
    """Cameras of a scene root and their frame files (sorted), plus the layout that was recognised."""

    root: Path
    layout: str  # "pku" or "flat"
    frames: dict[str, list[Path]]

    @property
    def names(self) -> list[str]:
        return list(self.frames)


def discover_scene(root: str | os.PathLike) -> Scene:
    """PKU-style when sub-folders hold images (one camera each); otherwise every image is one view."""
    path = Path(root).expanduser()
    if path.is_dir():
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
        cams = {}
        for d in subdirs:
            try:
                cams[d.name] = list_images(d)
            except InputError:
                logger.debug("%s holds no images; not a camera folder", d)
        if cams:
            loose = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
            if loose:
                logger.warning("%s: ignoring %d images beside the camera folders (e.g. %s)", path, len(loose),
                               loose[0].name)
            logger.info("scene %s: PKU-style, %d cameras (%s)", path, len(cams), ", ".join(list(cams)[:8]))
            return Scene(path, "pku", cams)
    images = list_images(path, recursive=False) if path.is_dir() else list_images(path)
    frames: dict[str, list[Path]] = {}
    for p in images:
        name = "_".join(p.stem.split())
        if name in frames:
            raise InputError(f"two images map to the view name {name!r}: {frames[name][0]} and {p}")
        frames[name] = [p]
    logger.info("scene %s: flat folder, %d views (one frame)", path, len(frames))
    return Scene(path, "flat", frames)


def candidate_views(scene: Scene, views: Sequence[str] | None = None, random_views: int | None = None,
                    seed: int = 0) -> tuple[list[str], bool]:
    """Cameras to try, in order, and whether the list is explicit (then no other camera may stand in)."""
    if views and random_views:
        raise InputError("give --views or --random_views, not both")
    if views:
        unknown = [v for v in views if v not in scene.frames]
        if unknown:
            raise InputError(f"--views {unknown} not found in {scene.root}; cameras there: {', '.join(scene.names)}")
        if len(set(views)) != len(views):
            raise InputError(f"--views lists a camera twice: {list(views)}")
        return list(views), True
    names = scene.names
    if random_views:
        if random_views > len(names):
            raise InputError(f"--random_views {random_views}: the scene has only {len(names)} cameras")
        order = random.Random(seed).sample(names, len(names))
        logger.info("random views (seed %d): %s", seed, ", ".join(order[:random_views]))
        return order, False
    return names, False


def _read(path: str | os.PathLike, what: str) -> Any:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{what} file not found: {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".json":
            return json.loads(p.read_text())
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as exc:
                raise MissingDependencyError(f"reading {p.name} needs PyYAML: pip install pyyaml") from exc
            try:
                return yaml.safe_load(p.read_text())
            except yaml.YAMLError as exc:
                raise InputError(f"cannot parse {what} file {p}: {exc}") from exc
        if suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
        raise InputError(f"cannot parse {what} file {p}: {exc}") from exc
    raise InputError(f"{what} file {p}: unsupported format {suffix!r}; use .json, .yaml or .npz")


def _entries(doc: Any, keys: Sequence[str], names: Sequence[str], what: str, src: Path) -> dict[str, Any]:
    """``{camera name: raw value}`` from any accepted layout (see the module docstring)."""
    if isinstance(doc, Mapping):
        inner = next((doc[k] for k in keys if k in doc), None)
        if "names" in doc:
            listed = [str(n) for n in np.asarray(doc["names"]).reshape(-1).tolist()]
            values = inner if inner is not None else next((v for k, v in doc.items() if k not in _META_KEYS), None)
            if values is None or len(values) != len(listed):
                raise InputError(f"{what} file {src}: {len(listed)} names but "
                                 f"{'no values' if values is None else len(values)} values")
            return dict(zip(listed, values))
        if inner is not None:
            doc = inner
    if isinstance(doc, Mapping):
        return {str(k): v for k, v in doc.items() if k not in _META_KEYS}
    if isinstance(doc, (list, np.ndarray)):
        items = list(doc)
        if items and all(isinstance(i, Mapping) and "name" in i for i in items):
            return {str(i["name"]): {k: v for k, v in i.items() if k != "name"} for i in items}
        if len(items) != len(names):
            raise InputError(f"{what} file {src} lists {len(items)} unnamed entries for {len(names)} cameras "
                             f"({', '.join(names)}); give names or one entry per camera in that order")
        return dict(zip(names, items))
    raise InputError(f"{what} file {src}: expected a mapping or a list, found {type(doc).__name__}")


def _matrix(value: Any, shapes: Sequence[tuple[int, ...]], what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what}: not a numeric array ({exc})") from exc
    if arr.shape not in shapes:
        raise InputError(f"{what}: shape {list(arr.shape)}, expected one of {[list(s) for s in shapes]}")
    if not np.isfinite(arr).all():
        raise InputError(f"{what}: contains non-finite values")
    return arr


def _check_rotation(rot: np.ndarray, what: str) -> None:
    if np.abs(rot.T @ rot - np.eye(3)).max() > 1e-3 or np.linalg.det(rot) <= 0:
        raise InputError(f"{what}: the rotation part is not a proper rotation (R^T R != I or det <= 0); "
                         "check the matrix layout and units")


def _pose_center(value: Any, convention: str, what: str) -> np.ndarray:
    if isinstance(value, Mapping):
        for key in ("center", "centre", "position"):
            if key in value:
                return _matrix(value[key], [(3,)], f"{what} {key}")
        for key, conv in (("c2w", "c2w"), ("cam_to_world", "c2w"), ("w2c", "w2c"), ("world_to_cam", "w2c"),
                          ("extrinsic", "w2c"), ("matrix", convention)):
            if key in value:
                return _pose_center(value[key], conv, what)
        if "R" in value and "t" in value:
            rot = _matrix(value["R"], [(3, 3)], f"{what} R")
            return _pose_center(np.concatenate([rot, _matrix(value["t"], [(3,), (3, 1)], f"{what} t")
                                                .reshape(3, 1)], 1), convention, what)
        raise InputError(f"{what}: expected a matrix, a centre, R/t or c2w/w2c, found keys {sorted(value)}")
    arr = _matrix(value, [(4, 4), (3, 4), (3,)], what)
    if arr.shape == (3,):
        return arr
    if arr.shape == (4, 4) and not np.allclose(arr[3], [0, 0, 0, 1], atol=1e-6):
        raise InputError(f"{what}: a 4x4 pose must end with the row [0, 0, 0, 1], found {arr[3].tolist()}")
    rot, t = arr[:3, :3], arr[:3, 3]
    _check_rotation(rot, what)
    return t.copy() if convention == "c2w" else -rot.T @ t


def load_pose_centers(path: str | os.PathLike, names: Sequence[str], convention: str | None = None
                      ) -> dict[str, np.ndarray]:
    """Known camera centres ``{name: [3]}`` for ``names``; InputError naming the file, camera and problem."""
    src = Path(path)
    doc = _read(src, "poses")
    file_conv = str(np.asarray(doc["convention"])) if isinstance(doc, Mapping) and "convention" in doc else None
    conv = (convention or file_conv or "c2w").lower()
    if conv not in ("c2w", "w2c"):
        raise InputError(f"poses convention {conv!r}: use c2w (camera-to-world) or w2c (world-to-camera)")
    if convention and file_conv and convention.lower() != file_conv.lower():
        raise InputError(f"--poses-convention {convention} contradicts {src.name}'s convention {file_conv}")
    entries = _entries(doc, ("poses", "cameras", "centers", "centres"), names, "poses", src)
    missing = [n for n in names if n not in entries]
    if missing:
        raise InputError(f"poses file {src} has no pose for cameras {missing}; it has {sorted(entries)}")
    extra = sorted(set(entries) - set(names))
    if extra:
        logger.info("poses file %s: ignoring %d cameras not used here (%s)", src.name, len(extra), ", ".join(extra[:8]))
    centers = {n: _pose_center(entries[n], conv, f"poses file {src.name}, camera {n}") for n in names}
    logger.info("loaded %d known camera poses from %s (%s)", len(centers), src, conv)
    return centers


def _intrinsic(value: Any, what: str) -> np.ndarray:
    if isinstance(value, Mapping):
        keys = ("fx", "fy", "cx", "cy")
        if not all(k in value for k in keys):
            if "K" in value:
                return _intrinsic(value["K"], what)
            raise InputError(f"{what}: expected a 3x3 K or fx, fy, cx, cy; found keys {sorted(value)}")
        fx, fy, cx, cy = (float(value[k]) for k in keys)
        k = np.array([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=np.float64)
    else:
        k = _matrix(value, [(3, 3)], what)
    if not (k[0, 0] > 0 and k[1, 1] > 0) or not np.allclose(k[2], [0, 0, 1]) or k[1, 0] != 0:
        raise InputError(f"{what}: not a pinhole K (fx, fy > 0, last row [0, 0, 1]): {k.tolist()}")
    if not np.isfinite(k).all():
        raise InputError(f"{what}: contains non-finite values")
    return k


def load_intrinsics(path: str | os.PathLike, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Known intrinsics ``{name: K [3, 3]}`` in source-image pixels for ``names``."""
    src = Path(path)
    doc = _read(src, "intrinsics")
    shared = None
    if isinstance(doc, Mapping):
        shared = next((doc[k] for k in ("K", "default") if k in doc), None)
        if shared is None and {"fx", "fy", "cx", "cy"} <= set(doc):
            shared = doc
    elif np.asarray(doc, dtype=object).shape == (3, 3):
        shared = doc
    if shared is not None:
        k = _intrinsic(shared, f"intrinsics file {src.name}")
        return {n: k for n in names}
    entries = _entries(doc, ("intrinsics", "cameras", "K"), names, "intrinsics", src)
    missing = [n for n in names if n not in entries]
    if missing:
        raise InputError(f"intrinsics file {src} has no intrinsics for cameras {missing}; it has {sorted(entries)}")
    return {n: _intrinsic(entries[n], f"intrinsics file {src.name}, camera {n}") for n in names}


def map_intrinsics(k: np.ndarray, scale_xy: tuple[float, float], offset_xy: tuple[float, float]) -> np.ndarray:
    """K of a source image after ``x' = a x + b`` in pixel-edge coordinates (OpenCV pixel centres at integers)."""
    (ax, ay), (bx, by) = scale_xy, offset_xy
    out = k.astype(np.float64).copy()
    out[0, 0], out[1, 1] = k[0, 0] * ax, k[1, 1] * ay
    out[0, 1] = k[0, 1] * ax
    out[0, 2] = ax * (k[0, 2] + 0.5) + bx - 0.5
    out[1, 2] = ay * (k[1, 2] + 0.5) + by - 0.5
    return out
