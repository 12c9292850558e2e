"""Point clouds and cameras on disk: PLY, cameras JSON, COLMAP text; filtering and downsampling.

Every file is written to a temporary name beside its target and renamed when complete
(:mod:`vggt_trt.atomic`). PLY files are binary little-endian with ``float x, y, z``,
``uchar red, green, blue`` and ``float confidence``, which Open3D, MeshLab and CloudCompare read.
Cameras are camera-from-world, OpenCV axes, as VGGT predicts them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import atomic_path, write_json_atomic
from ..errors import InputError
from .geometry import Array, array_ops, as_float, confidence_mask, is_torch, mat_to_quat

log = logging.getLogger(__name__)

__all__ = [
    "write_ply",
    "read_ply",
    "voxel_downsample",
    "filter_points",
    "colors_from_images",
    "write_cameras_json",
    "read_cameras_json",
    "write_colmap_text",
]

PathLike = str | os.PathLike


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if is_torch(x) else np.asarray(x)


def _rgb_uint8(rgb: Any, n: int) -> np.ndarray:
    """Colours ``[N, 3]`` as uint8: integers are taken as 0..255, floats as 0..1 (rounded)."""
    rgb = _np(rgb).reshape(-1, 3)
    if rgb.shape[0] != n:
        raise InputError(f"rgb has {rgb.shape[0]} colours for {n} points")
    if rgb.dtype == np.uint8:
        return rgb
    if rgb.dtype.kind in "iu":
        return np.clip(rgb, 0, 255).astype(np.uint8)
    return np.round(np.clip(np.nan_to_num(rgb.astype(np.float32)), 0.0, 1.0) * 255.0).astype(np.uint8)


def _points(xyz: Any) -> np.ndarray:
    xyz = _np(xyz)
    if xyz.ndim < 1 or xyz.shape[-1] != 3:
        raise InputError(f"xyz: expected shape [..., 3], found {list(xyz.shape)}")
    return xyz.reshape(-1, 3)


def write_ply(path: PathLike, xyz: Any, rgb: Any = None, conf: Any = None) -> Path:
    """Write points ``[..., 3]`` (+ colours ``[..., 3]``, confidences ``[...]``) as binary PLY."""
    from plyfile import PlyData, PlyElement

    pts = _points(xyz)
    n = pts.shape[0]
    fields: list[tuple[str, str]] = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    colours = None if rgb is None else _rgb_uint8(rgb, n)
    confidence = None if conf is None else _np(conf).reshape(-1).astype("<f4")
    if colours is not None:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if confidence is not None:
        if confidence.shape[0] != n:
            raise InputError(f"conf has {confidence.shape[0]} values for {n} points")
        fields.append(("confidence", "<f4"))
    vertex = np.empty(n, dtype=fields)
    vertex["x"], vertex["y"], vertex["z"] = pts[:, 0], pts[:, 1], pts[:, 2]
    if colours is not None:
        vertex["red"], vertex["green"], vertex["blue"] = colours[:, 0], colours[:, 1], colours[:, 2]
    if confidence is not None:
        vertex["confidence"] = confidence
    ply = PlyData([PlyElement.describe(vertex, "vertex")], text=False, byte_order="<")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            ply.write(f)
    log.info("wrote %d points to %s", n, path)
    return Path(path)


def read_ply(path: PathLike) -> dict[str, np.ndarray]:
    """Read a PLY's vertices: ``xyz [N, 3]``, ``rgb [N, 3]`` uint8 and ``conf [N]`` when present.

    Any other vertex property is returned under its own name.
    """
    from plyfile import PlyData, PlyParseError

    path = Path(path)
    try:
        ply = PlyData.read(os.fspath(path))
        vertex = ply["vertex"].data
    except FileNotFoundError as exc:
        raise InputError(f"PLY file not found: {path}") from exc
    except (PlyParseError, KeyError, ValueError, OSError) as exc:
        raise InputError(f"cannot read PLY {path}: {exc}") from exc
    names = list(vertex.dtype.names or ())
    if not {"x", "y", "z"} <= set(names):
        raise InputError(f"PLY {path} has no x/y/z vertex properties (found {names})")
    out: dict[str, np.ndarray] = {"xyz": np.stack([vertex["x"], vertex["y"], vertex["z"]], -1)}
    used = {"x", "y", "z"}
    if {"red", "green", "blue"} <= set(names):
        out["rgb"] = np.stack([vertex["red"], vertex["green"], vertex["blue"]], -1).astype(np.uint8)
        used |= {"red", "green", "blue"}
    if "confidence" in names:
        out["conf"] = np.asarray(vertex["confidence"])
        used.add("confidence")
    for name in names:
        if name not in used:
            out[name] = np.asarray(vertex[name])
    return out


def voxel_downsample(
    xyz: Any,
    rgb: Any,
    conf: Any,
    voxel_size: float,
    conf_reduce: str = "max",
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """One point per occupied voxel: mean position and colour, max (or mean) confidence.

    Voxels are ``floor(xyz / voxel_size)`` (in the cloud's units; VGGT's frame is scale-normalised);
    output is ordered by voxel key. ``rgb`` / ``conf`` may be None. Colours keep their dtype (uint8
    means are rounded). Non-finite points must be filtered first (:func:`filter_points`).
    """
    if not voxel_size > 0:
        raise InputError(f"voxel_size must be > 0, found {voxel_size}")
    if conf_reduce not in ("max", "mean"):
        raise InputError(f"conf_reduce must be 'max' or 'mean', found {conf_reduce!r}")
    pts = _points(xyz)
    n = pts.shape[0]
    colours = None if rgb is None else _np(rgb).reshape(-1, 3)
    confidence = None if conf is None else _np(conf).reshape(-1)
    if colours is not None and colours.shape[0] != n:
        raise InputError(f"rgb has {colours.shape[0]} colours for {n} points")
    if confidence is not None and confidence.shape[0] != n:
        raise InputError(f"conf has {confidence.shape[0]} values for {n} points")
    if n == 0:
        copy = [None if a is None else a.copy() for a in (pts, colours, confidence)]
        return copy[0], copy[1], copy[2]
    if not np.isfinite(pts).all():
        raise InputError("voxel_downsample: xyz contains non-finite values; filter them first")
    keys = np.floor(pts.astype(np.float64) / voxel_size).astype(np.int64)
    keys -= keys.min(0)
    extent = keys.max(0) + 1
    if float(extent[0]) * float(extent[1]) * float(extent[2]) < 2**62:
        flat = (keys[:, 0] * extent[1] + keys[:, 1]) * extent[2] + keys[:, 2]
        _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    else:  # enormous extent relative to the voxel size: fall back to row-wise unique
        _, inverse, counts = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    m = counts.shape[0]

    def mean_of(values: np.ndarray) -> np.ndarray:
        acc = np.stack([np.bincount(inverse, weights=values[:, c].astype(np.float64), minlength=m)
                        for c in range(values.shape[1])], -1)
        return acc / counts[:, None]

    out_xyz = mean_of(pts).astype(pts.dtype if pts.dtype.kind == "f" else np.float32)
    out_rgb = None
    if colours is not None:
        mean_rgb = mean_of(colours)
        out_rgb = (np.round(mean_rgb) if colours.dtype.kind in "iu" else mean_rgb).astype(colours.dtype)
    out_conf = None
    if confidence is not None:
        if conf_reduce == "mean":
            out_conf = mean_of(confidence[:, None])[:, 0].astype(confidence.dtype)
        else:
            order = np.argsort(inverse, kind="stable")
            starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
            out_conf = np.maximum.reduceat(confidence[order], starts)
    log.debug("voxel downsample (%.4g): %d -> %d points", voxel_size, n, m)
    return out_xyz, out_rgb, out_conf


def filter_points(
    xyz: Array,
    rgb: Array | None = None,
    conf: Array | None = None,
    threshold: float | None = None,
    percentile: float | None = None,
    mask: Array | None = None,
) -> tuple[Array, Array | None, Array | None]:
    """Flatten and keep finite points that pass the confidence filter and an optional extra mask.

    ``xyz [..., 3]``, ``rgb [..., 3]``, ``conf [...]`` and ``mask [...]`` (bool) share their
    leading shape; numpy or torch (on any device). See :func:`vggt_trt.recon.geometry.confidence_mask`
    for ``threshold`` / ``percentile``. Returns ``xyz [N, 3]``, ``rgb [N, 3]``, ``conf [N]``.
    """
    xyz = as_float(xyz, "xyz")
    ops = array_ops(xyz)
    if xyz.ndim < 1 or xyz.shape[-1] != 3:
        raise InputError(f"xyz: expected shape [..., 3], found {list(xyz.shape)}")
    lead = tuple(xyz.shape[:-1])
    finite = ops.isfinite(xyz)
    keep = finite[..., 0] & finite[..., 1] & finite[..., 2]  # much faster than .all(-1) in numpy
    if conf is not None:
        if tuple(conf.shape) != lead:
            raise InputError(f"conf shape {list(conf.shape)} does not match points {list(lead)}")
        keep = keep & confidence_mask(conf, threshold=threshold, percentile=percentile)
    elif threshold is not None or percentile is not None:
        raise InputError("a confidence threshold/percentile needs conf")
    if mask is not None:
        if tuple(mask.shape) != lead:
            raise InputError(f"mask shape {list(mask.shape)} does not match points {list(lead)}")
        keep = keep & mask
    if rgb is not None and tuple(rgb.shape) != lead + (3,):
        raise InputError(f"rgb shape {list(rgb.shape)} does not match points {list(lead) + [3]}")
    total = int(np.prod(lead)) if lead else 1
    if is_torch(xyz):
        out = [None if a is None else a[keep] for a in (xyz, rgb, conf)]
    else:  # one index list and np.take: several times faster than three boolean gathers
        idx = np.flatnonzero(keep)
        out = [None if a is None
               else np.take(np.asarray(a).reshape((total,) + tuple(a.shape[len(lead):])), idx, axis=0)
               for a in (xyz, rgb, conf)]
    log.debug("filter_points kept %d of %d points", int(out[0].shape[0]), total)
    return out[0], out[1], out[2]


def colors_from_images(images: Array) -> Array:
    """Images ``[S, 3, H, W]`` float in [0, 1] to uint8 colours ``[S, H, W, 3]`` (rounded, clipped).

    The official demos truncate (``(x * 255).astype(uint8)``), which maps resampled values just
    below an 8-bit level (e.g. 0.99999) to the level below; rounding gives the nearest level.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise InputError(f"images: expected [S, 3, H, W], found {list(images.shape)}")
    if is_torch(images):
        import torch

        return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    arr = np.asarray(images)
    colours = np.round(np.clip(arr, 0, 1) * 255).astype(np.uint8)
    return np.ascontiguousarray(colours.transpose(0, 2, 3, 1))


# --------------------------------------------------------------------------- cameras


def _cameras(extrinsic: Any, intrinsic: Any, image_names: Sequence[str], image_hw: Any
             ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    extr = _np(extrinsic).astype(np.float64)
    intr = _np(intrinsic).astype(np.float64)
    if extr.ndim == 4 and extr.shape[0] == 1:  # [1, S, 3, 4] as the model returns it
        extr = extr[0]
    if intr.ndim == 4 and intr.shape[0] == 1:
        intr = intr[0]
    if extr.ndim != 3 or extr.shape[1:] not in ((3, 4), (4, 4)):
        raise InputError(f"extrinsic: expected [S, 3, 4], found {list(extr.shape)}")
    if intr.shape != (extr.shape[0], 3, 3):
        raise InputError(f"intrinsic: expected [{extr.shape[0]}, 3, 3], found {list(intr.shape)}")
    names = [str(n) for n in image_names]
    if len(names) != extr.shape[0]:
        raise InputError(f"{len(names)} image names for {extr.shape[0]} cameras")
    hw = np.asarray(image_hw, dtype=np.int64)
    hw = np.broadcast_to(hw, (extr.shape[0], 2)) if hw.shape == (2,) else hw
    if hw.shape != (extr.shape[0], 2):
        raise InputError(f"image_hw: expected (H, W) or [S, 2], found {list(np.shape(image_hw))}")
    return extr[:, :3, :4], intr, names, hw


def write_cameras_json(
    path: PathLike, extrinsic: Any, intrinsic: Any, image_names: Sequence[str], image_hw: Any
) -> Path:
    """Cameras as JSON: per image its name, size, 3x4 cam-from-world extrinsic, 3x3 intrinsic, centre."""
    extr, intr, names, hw = _cameras(extrinsic, intrinsic, image_names, image_hw)
    centers = -np.einsum("sji,sj->si", extr[:, :, :3], extr[:, :, 3])
    doc = {
        "convention": "OpenCV camera axes (x right, y down, z forward); extrinsic is camera-from-world: "
                      "x_cam = R @ x_world + t; intrinsic in pixels of the image size given",
        "cameras": [
            {"image_name": names[i], "height": int(hw[i, 0]), "width": int(hw[i, 1]),
             "extrinsic": extr[i].tolist(), "intrinsic": intr[i].tolist(),
             "fx": float(intr[i, 0, 0]), "fy": float(intr[i, 1, 1]),
             "cx": float(intr[i, 0, 2]), "cy": float(intr[i, 1, 2]),
             "center": centers[i].tolist()}
            for i in range(len(names))
        ],
    }
    write_json_atomic(path, doc)
    log.info("wrote %d cameras to %s", len(names), path)
    return Path(path)


def read_cameras_json(path: PathLike) -> dict[str, Any]:
    """Read :func:`write_cameras_json` output.

    Returns ``extrinsic [S, 3, 4]``, ``intrinsic [S, 3, 3]``, ``image_names`` and ``image_hw [S, 2]``.
    """
    import json

    try:
        doc = json.loads(Path(path).read_text())
        cams = doc["cameras"]
        return {
            "extrinsic": np.asarray([c["extrinsic"] for c in cams], dtype=np.float64).reshape(-1, 3, 4),
            "intrinsic": np.asarray([c["intrinsic"] for c in cams], dtype=np.float64).reshape(-1, 3, 3),
            "image_names": [c["image_name"] for c in cams],
            "image_hw": np.asarray([[c["height"], c["width"]] for c in cams], np.int64).reshape(-1, 2),
        }
    except FileNotFoundError as exc:
        raise InputError(f"cameras file not found: {path}") from exc
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"cannot read cameras JSON {path}: {exc}") from exc


def write_colmap_text(
    out_dir: PathLike,
    extrinsic: Any,
    intrinsic: Any,
    image_names: Sequence[str],
    image_hw: Any,
    xyz: Any = None,
    rgb: Any = None,
) -> dict[str, Path]:
    """Write a COLMAP text model: ``cameras.txt``, ``images.txt``, ``points3D.txt``.

    ``cameras.txt`` has one ``PINHOLE fx fy cx cy`` camera per image.

    ``images.txt`` holds ``IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME`` (cam-from-world, as
    COLMAP and VGGT both use) followed by an empty 2D-points line; points carry no tracks
    (error 0), which Gaussian-splatting loaders accept as an initial cloud. Intrinsics are written
    as given: VGGT's ``cx = W/2`` matches COLMAP's pixel-centre-at-0.5 convention.
    """
    extr, intr, names, hw = _cameras(extrinsic, intrinsic, image_names, image_hw)
    bad = [n for n in names if not n or any(ch.isspace() for ch in n)]
    if bad:
        raise InputError(f"COLMAP image names cannot be empty or contain whitespace: {bad[:3]}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = len(names)
    quat_xyzw = mat_to_quat(extr[:, :, :3])
    qvec = quat_xyzw[:, [3, 0, 1, 2]]
    cam_lines = [
        f"{i + 1} PINHOLE {int(hw[i, 1])} {int(hw[i, 0])} "
        + " ".join(repr(float(v)) for v in (intr[i, 0, 0], intr[i, 1, 1], intr[i, 0, 2], intr[i, 1, 2]))
        for i in range(s)
    ]
    img_lines: list[str] = []
    for i in range(s):
        vals = " ".join(repr(float(v)) for v in (*qvec[i], *extr[i, :, 3]))
        img_lines += [f"{i + 1} {vals} {i + 1} {names[i]}", ""]
    paths = {name: out / f"{name}.txt" for name in ("cameras", "images", "points3D")}
    with atomic_path(paths["cameras"]) as tmp:
        tmp.write_text(
            "# Camera list with one line of data per camera:\n"
            "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
            f"# Number of cameras: {s}\n" + "\n".join(cam_lines) + "\n"
        )
    with atomic_path(paths["images"]) as tmp:
        tmp.write_text(
            "# Image list with two lines of data per image:\n"
            "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
            "#   POINTS2D[] as (X, Y, POINT3D_ID)\n"
            f"# Number of images: {s}, mean observations per image: 0\n" + "\n".join(img_lines) + "\n"
        )
    pts = np.zeros((0, 3)) if xyz is None else _points(xyz).astype(np.float64)
    cols = np.full((pts.shape[0], 3), 128, np.uint8) if rgb is None else _rgb_uint8(rgb, pts.shape[0])
    with atomic_path(paths["points3D"]) as tmp:
        with open(tmp, "w") as f:
            f.write("# 3D point list with one line of data per point:\n"
                    "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
                    f"# Number of points: {pts.shape[0]}, mean track length: 0\n")
            n = pts.shape[0]
            if n:
                # one %-format over all rows: twice as fast as np.savetxt's row loop
                columns = [range(1, n + 1), *pts.T.tolist(), *cols.astype(np.int64).T.tolist()]
                f.write(("%d %.9g %.9g %.9g %d %d %d 0\n" * n) % tuple(v for row in zip(*columns) for v in row))
    log.info("wrote COLMAP text model (%d cameras, %d points) to %s", s, pts.shape[0], out)
    return paths
