"""What the viewer shows, read from a ``pcd_inference.py`` output folder (no viser needed here).

The folder holds ``points.ply`` (xyz, colours, confidence), ``cameras.json`` (OpenCV cam-from-world
extrinsics and pixel intrinsics), ``images/<image_name>`` (the preprocessed views the cameras describe)
and ``summary.json`` (the frame and, when ``--poses`` was given, the rig alignment). Points and cameras are
already in the output frame, so the viewer draws them as they are.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..recon.pointcloud import read_cameras_json, read_ply

logger = logging.getLogger(__name__)

DEFAULT_MAX_POINTS = 1_000_000
THUMBNAIL_SIDE = 256


@dataclass
class ViewCamera:
    name: str
    extrinsic: np.ndarray  # [3, 4] cam-from-world
    intrinsic: np.ndarray  # [3, 3] pixels of (height, width)
    height: int
    width: int
    image: Path | None  # the saved view, when the run kept it

    @property
    def fov_y(self) -> float:
        """Vertical field of view in radians."""
        return float(2 * np.arctan2(self.height / 2, self.intrinsic[1, 1]))

    @property
    def aspect(self) -> float:
        return self.width / self.height


@dataclass
class ViewScene:
    """Points (already subsampled to the budget), cameras and the frame they live in."""

    root: Path
    xyz: np.ndarray  # [N, 3] float32
    rgb: np.ndarray  # [N, 3] uint8
    conf: np.ndarray | None  # [N] float32
    points_in_file: int
    cameras: list[ViewCamera]
    frame: str
    alignment: dict[str, Any] | None


def subsample_indices(n: int, budget: int) -> np.ndarray:
    """``min(n, budget)`` indices spread evenly over ``range(n)``: deterministic, order kept."""
    if budget < 1:
        raise InputError(f"point budget must be >= 1, found {budget}")
    if n <= budget:
        return np.arange(n)
    return np.linspace(0, n - 1, budget).round().astype(np.int64)


def _summary(root: Path) -> dict[str, Any]:
    path = root / "summary.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc


def load_scene(out_dir: str | Path, max_points: int = DEFAULT_MAX_POINTS) -> ViewScene:
    """Read an output folder; keep at most ``max_points`` points (evenly spread, same result every time)."""
    root = Path(out_dir)
    if not root.is_dir():
        raise InputError(f"output folder not found: {root}")
    missing = [name for name in ("points.ply", "cameras.json") if not (root / name).is_file()]
    if missing:
        raise InputError(f"{root} is not a pcd_inference output folder: missing {', '.join(missing)}")
    ply = read_ply(root / "points.ply")
    n = ply["xyz"].shape[0]
    keep = subsample_indices(n, max_points)
    if keep.size < n:
        logger.info("showing %d of %d points (--max-points)", keep.size, n)
    rgb = ply.get("rgb")
    rgb = np.full((n, 3), 200, np.uint8) if rgb is None else rgb
    conf = ply.get("conf")
    cams = read_cameras_json(root / "cameras.json")
    cameras = []
    for name, extr, intr, (h, w) in zip(cams["image_names"], cams["extrinsic"], cams["intrinsic"], cams["image_hw"]):
        image = root / "images" / name
        cameras.append(ViewCamera(name=name, extrinsic=extr, intrinsic=intr, height=int(h), width=int(w),
                                  image=image if image.is_file() else None))
    summary = _summary(root)
    return ViewScene(root=root, xyz=ply["xyz"][keep].astype(np.float32), rgb=rgb[keep],
                     conf=None if conf is None else conf[keep].astype(np.float32), points_in_file=n,
                     cameras=cameras, frame=summary.get("frame", "unknown (no summary.json)"),
                     alignment=summary.get("alignment"))


def thumbnail(path: Path, max_side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """The image as ``[h, w, 3]`` uint8, longest side at most ``max_side``."""
    from ..recon.preprocess import load_image

    img = load_image(path)
    img.thumbnail((max_side, max_side))
    return np.asarray(img)
