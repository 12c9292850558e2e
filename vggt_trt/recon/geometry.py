"""Camera and point geometry for VGGT outputs, vectorised for numpy arrays and torch tensors.

Every public function takes either numpy arrays or torch tensors and returns the same kind
(dispatch on the type of the first array argument; torch is imported lazily, only when a tensor
is passed). Semantics follow the official facebookresearch/vggt utilities at commit 44b3afbd
(``vggt/utils/pose_enc.py``, ``rotation.py``, ``geometry.py``):

- pose encoding ``absT_quaR_FoV``: ``[T(3), quat xyzw (4), fov_h, fov_w]``;
- extrinsics are camera-from-world, OpenCV axes (x right, y down, z forward): ``x_cam = R x_w + t``;
- intrinsics ``fx = (W/2)/tan(fov_w/2)``, ``fy = (H/2)/tan(fov_h/2)``, ``cx = W/2``, ``cy = H/2``;
- unprojection uses integer pixel coordinates ``u - cx`` (no half-pixel shift, exactly as the
  reference; ``pixel_offset=0.5`` gives the pixel-centre variant of upstream PR #433).

Differences from the reference, all deliberate: any number of leading batch dimensions; results
keep the input dtype (the reference casts pose encodings to float32 and builds float64 inverse
matrices in numpy); no in-place writes (the torch path stays ONNX-exportable).
"""

from __future__ import annotations

import logging
import math
import sys
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, NamedTuple, Sequence, Union

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    Array = Union[np.ndarray, torch.Tensor]
else:
    Array = Any

log = logging.getLogger(__name__)

__all__ = [
    "is_torch",
    "quat_to_mat",
    "mat_to_quat",
    "pose_encoding_to_extri_intri",
    "extri_intri_to_pose_encoding",
    "closed_form_inverse_se3",
    "camera_centers",
    "unproject_depth_map_to_point_map",
    "confidence_mask",
    "UmeyamaResult",
    "umeyama_similarity",
    "apply_similarity",
    "similarity_transform_extrinsics",
]


def is_torch(x: Any) -> bool:
    """True when ``x`` is a torch tensor (without importing torch when nobody else has)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _make_ops(torch: Any = None) -> SimpleNamespace:
    """The few array operations whose numpy and torch spellings differ, under one set of names."""
    if torch is None:
        return SimpleNamespace(
            stack=lambda xs, axis: np.stack(xs, axis=axis),
            concat=lambda xs, axis: np.concatenate(xs, axis=axis),
            swap=lambda x: np.swapaxes(x, -1, -2),
            take_along=lambda x, idx, axis: np.take_along_axis(x, idx, axis=axis),
            arange=lambda n, like: np.arange(n, dtype=like.dtype),
            full_like=np.full_like,
            clamp_min=lambda x, v: np.maximum(x, np.asarray(v, dtype=x.dtype)),
            sqrt=np.sqrt, tan=np.tan, atan=np.arctan, where=np.where, isfinite=np.isfinite,
            svd=np.linalg.svd, det=np.linalg.det,
        )
    return SimpleNamespace(
        stack=lambda xs, axis: torch.stack(list(xs), dim=axis),
        concat=lambda xs, axis: torch.cat(list(xs), dim=axis),
        swap=lambda x: x.transpose(-1, -2),
        take_along=lambda x, idx, axis: torch.take_along_dim(x, idx, dim=axis),
        arange=lambda n, like: torch.arange(n, dtype=like.dtype, device=like.device),
        full_like=torch.full_like,
        clamp_min=lambda x, v: x.clamp_min(v),
        sqrt=torch.sqrt, tan=torch.tan, atan=torch.atan, where=torch.where, isfinite=torch.isfinite,
        svd=torch.linalg.svd, det=torch.linalg.det,
    )


_NUMPY_OPS = _make_ops()
_TORCH_OPS: SimpleNamespace | None = None


def array_ops(x: Any) -> SimpleNamespace:
    """numpy or torch operations, matching the type of ``x`` (imports torch only for a tensor)."""
    global _TORCH_OPS
    if not is_torch(x):
        return _NUMPY_OPS
    if _TORCH_OPS is None:
        import torch

        _TORCH_OPS = _make_ops(torch)
    return _TORCH_OPS


def as_float(x: Any, name: str) -> Array:
    """numpy: non-float inputs become float64 arrays; torch: non-float tensors become float32."""
    if is_torch(x):
        return x if x.is_floating_point() else x.float()
    arr = np.asarray(x)
    if arr.dtype.kind != "f":
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(f"{name}: expected a numeric array, got dtype {arr.dtype}") from exc
    return arr


def _check_trailing(x: Array, shape: tuple[int, ...], name: str) -> None:
    if tuple(x.shape[-len(shape):]) != shape or x.ndim < len(shape):
        want = "x".join(str(s) for s in shape)
        raise InputError(f"{name}: expected shape [..., {want}], found {list(x.shape)}")


def _image_hw(image_hw: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in image_hw)
    except (TypeError, ValueError) as exc:
        raise InputError(f"image_hw must be (height, width), found {image_hw!r}") from exc
    if h <= 0 or w <= 0:
        raise InputError(f"image_hw must be positive, found {(h, w)}")
    return h, w


# --------------------------------------------------------------------------- rotations


def quat_to_mat(quat: Array) -> Array:
    """Quaternions ``[..., 4]`` (x, y, z, w; scalar last) to rotation matrices ``[..., 3, 3]``.

    Like the reference, ``two_s = 2 / |q|^2`` absorbs the norm (no explicit normalisation), so
    any non-zero quaternion gives a proper rotation.
    """
    quat = as_float(quat, "quat")
    _check_trailing(quat, (4,), "quat")
    ops = array_ops(quat)
    i, j, k, r = quat[..., 0], quat[..., 1], quat[..., 2], quat[..., 3]
    two_s = 2.0 / (quat * quat).sum(-1)
    o = ops.stack(
        (
            1 - two_s * (j * j + k * k),
            two_s * (i * j - k * r),
            two_s * (i * k + j * r),
            two_s * (i * j + k * r),
            1 - two_s * (i * i + k * k),
            two_s * (j * k - i * r),
            two_s * (i * k - j * r),
            two_s * (j * k + i * r),
            1 - two_s * (i * i + j * j),
        ),
        -1,
    )
    return o.reshape(tuple(quat.shape[:-1]) + (3, 3))


def mat_to_quat(matrix: Array) -> Array:
    """Rotation matrices ``[..., 3, 3]`` to quaternions ``[..., 4]`` (x, y, z, w), with w >= 0.

    The reference (PyTorch3D) algorithm: four candidate quaternions, keep the best-conditioned one.
    """
    matrix = as_float(matrix, "matrix")
    _check_trailing(matrix, (3, 3), "matrix")
    ops = array_ops(matrix)
    m00, m01, m02 = matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 0, 2]
    m10, m11, m12 = matrix[..., 1, 0], matrix[..., 1, 1], matrix[..., 1, 2]
    m20, m21, m22 = matrix[..., 2, 0], matrix[..., 2, 1], matrix[..., 2, 2]
    sq = ops.stack(
        [
            1.0 + m00 + m11 + m22,
            1.0 + m00 - m11 - m22,
            1.0 - m00 + m11 - m22,
            1.0 - m00 - m11 + m22,
        ],
        -1,
    )
    q_abs = ops.sqrt(ops.clamp_min(sq, 0.0))  # sqrt of the positive part
    by_rijk = ops.stack(
        [
            ops.stack([q_abs[..., 0] ** 2, m21 - m12, m02 - m20, m10 - m01], -1),
            ops.stack([m21 - m12, q_abs[..., 1] ** 2, m10 + m01, m02 + m20], -1),
            ops.stack([m02 - m20, m10 + m01, q_abs[..., 2] ** 2, m12 + m21], -1),
            ops.stack([m10 - m01, m20 + m02, m21 + m12, q_abs[..., 3] ** 2], -1),
        ],
        -2,
    )
    candidates = by_rijk / (2.0 * ops.clamp_min(q_abs, 0.1))[..., None]
    rijk = ops.take_along(candidates, q_abs.argmax(-1)[..., None, None], -2)[..., 0, :]
    xyzw = ops.stack([rijk[..., 1], rijk[..., 2], rijk[..., 3], rijk[..., 0]], -1)
    return ops.where(xyzw[..., 3:4] < 0, -xyzw, xyzw)


# --------------------------------------------------------------------------- pose encoding


def pose_encoding_to_extri_intri(
    pose_enc: Array, image_hw: Sequence[int], build_intrinsics: bool = True
) -> tuple[Array, Array | None]:
    """Decode pose encodings ``[..., 9]`` to extrinsics ``[..., 3, 4]`` and intrinsics ``[..., 3, 3]``.

    ``image_hw`` is the (height, width) of the model input. With ``build_intrinsics=False`` the
    intrinsics are ``None`` (as in the reference).
    """
    pose_enc = as_float(pose_enc, "pose_enc")
    _check_trailing(pose_enc, (9,), "pose_enc")
    ops = array_ops(pose_enc)
    t = pose_enc[..., :3]
    rot = quat_to_mat(pose_enc[..., 3:7])
    extrinsic = ops.concat([rot, t[..., None]], -1)
    if not build_intrinsics:
        return extrinsic, None
    h, w = _image_hw(image_hw)
    fy = (h / 2.0) / ops.tan(pose_enc[..., 7] / 2.0)
    fx = (w / 2.0) / ops.tan(pose_enc[..., 8] / 2.0)
    zero = ops.full_like(fx, 0.0)
    intrinsic = ops.stack(
        [fx, zero, ops.full_like(fx, w / 2), zero, fy, ops.full_like(fx, h / 2), zero, zero,
         ops.full_like(fx, 1.0)],
        -1,
    ).reshape(tuple(fx.shape) + (3, 3))
    return extrinsic, intrinsic


def extri_intri_to_pose_encoding(
    extrinsic: Array, intrinsic: Array, image_hw: Sequence[int]
) -> Array:
    """Encode extrinsics ``[..., 3, 4]`` and intrinsics ``[..., 3, 3]`` as ``[..., 9]`` (the inverse)."""
    extrinsic = as_float(extrinsic, "extrinsic")
    intrinsic = as_float(intrinsic, "intrinsic")
    _check_trailing(extrinsic, (3, 4), "extrinsic")
    _check_trailing(intrinsic, (3, 3), "intrinsic")
    ops = array_ops(extrinsic)
    h, w = _image_hw(image_hw)
    quat = mat_to_quat(extrinsic[..., :3, :3])
    fov_h = 2 * ops.atan((h / 2) / intrinsic[..., 1, 1])
    fov_w = 2 * ops.atan((w / 2) / intrinsic[..., 0, 0])
    return ops.concat([extrinsic[..., :3, 3], quat, fov_h[..., None], fov_w[..., None]], -1)


# --------------------------------------------------------------------------- SE(3)


def closed_form_inverse_se3(se3: Array) -> Array:
    """Invert rigid transforms ``[..., 3, 4]`` or ``[..., 4, 4]``; returns ``[..., 4, 4]``."""
    se3 = as_float(se3, "se3")
    if se3.ndim < 2 or tuple(se3.shape[-2:]) not in ((3, 4), (4, 4)):
        raise InputError(f"se3: expected shape [..., 3, 4] or [..., 4, 4], found {list(se3.shape)}")
    ops = array_ops(se3)
    rot_t = ops.swap(se3[..., :3, :3])
    top_right = -(rot_t @ se3[..., :3, 3:])
    top = ops.concat([rot_t, top_right], -1)
    bottom = ops.stack(
        [ops.full_like(top_right[..., 0, 0], v) for v in (0.0, 0.0, 0.0, 1.0)], -1
    )[..., None, :]
    return ops.concat([top, bottom], -2)


def camera_centers(extrinsic: Array) -> Array:
    """World positions ``[..., 3]`` of cameras with cam-from-world extrinsics ``[..., 3|4, 4]``."""
    extrinsic = as_float(extrinsic, "extrinsic")
    if extrinsic.ndim < 2 or tuple(extrinsic.shape[-2:]) not in ((3, 4), (4, 4)):
        raise InputError(
            f"extrinsic: expected [..., 3, 4] or [..., 4, 4], found {list(extrinsic.shape)}"
        )
    ops = array_ops(extrinsic)
    return -(ops.swap(extrinsic[..., :3, :3]) @ extrinsic[..., :3, 3:])[..., 0]


# --------------------------------------------------------------------------- unprojection


def unproject_depth_map_to_point_map(
    depth: Array,
    extrinsic: Array,
    intrinsic: Array,
    pixel_offset: float = 0.0,
    dtype: Any = None,
) -> Array:
    """Depth ``[..., H, W]`` or ``[..., H, W, 1]`` to world points ``[..., H, W, 3]``.

    ``extrinsic [..., 3, 4]`` (cam-from-world) and ``intrinsic [..., 3, 3]`` share the leading
    dimensions of ``depth`` (e.g. ``S``). Camera coordinates are ``((u - cx + pixel_offset) d / fx,
    (v - cy + pixel_offset) d / fy, d)``, then ``x_w = R^T x_c - R^T t``, all frames at once.
    Computed in the promoted dtype of the inputs (float32 in, float32 out) unless ``dtype`` is
    given (numpy dtype for arrays, torch dtype for tensors).
    """
    torch_path = is_torch(depth)
    if torch_path:  # cameras given as numpy arrays follow the depth tensor (device, type)
        import torch

        extrinsic, intrinsic = (torch.as_tensor(a, device=depth.device) for a in (extrinsic, intrinsic))
    depth = as_float(depth, "depth")
    extrinsic = as_float(extrinsic, "extrinsic")
    intrinsic = as_float(intrinsic, "intrinsic")
    _check_trailing(extrinsic, (3, 4), "extrinsic")
    _check_trailing(intrinsic, (3, 3), "intrinsic")
    lead = tuple(extrinsic.shape[:-2])
    if depth.ndim == len(lead) + 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != len(lead) + 2 or tuple(depth.shape[:-2]) != lead:
        raise InputError(
            f"depth: expected shape {list(lead)} + [H, W] or [H, W, 1] to match extrinsic "
            f"{list(extrinsic.shape)}, found {list(depth.shape)}"
        )
    if tuple(intrinsic.shape[:-2]) != lead:
        raise InputError(
            f"intrinsic: leading dims {list(intrinsic.shape[:-2])} do not match extrinsic {list(lead)}"
        )
    if torch_path:
        if dtype is None:
            dtype = torch.promote_types(depth.dtype, extrinsic.dtype)
            dtype = torch.promote_types(dtype, intrinsic.dtype)
        depth = depth.to(dtype)
        extrinsic = extrinsic.to(device=depth.device, dtype=dtype)
        intrinsic = intrinsic.to(device=depth.device, dtype=dtype)
    else:
        if dtype is None:
            dtype = np.result_type(depth.dtype, extrinsic.dtype, intrinsic.dtype)
        depth = np.asarray(depth, dtype=dtype)
        extrinsic = np.asarray(extrinsic, dtype=dtype)
        intrinsic = np.asarray(intrinsic, dtype=dtype)
    ops = array_ops(depth)
    h, w = depth.shape[-2:]
    fx = intrinsic[..., 0, 0][..., None, None]
    fy = intrinsic[..., 1, 1][..., None, None]
    cx = intrinsic[..., 0, 2][..., None, None]
    cy = intrinsic[..., 1, 2][..., None, None]
    u = ops.arange(w, depth)  # [W]
    v = ops.arange(h, depth)[:, None]  # [H, 1]
    cam = ops.stack(
        [(u - cx + pixel_offset) * depth / fx, (v - cy + pixel_offset) * depth / fy, depth], -1
    )  # [..., H, W, 3]
    cam_to_world = closed_form_inverse_se3(extrinsic)  # [..., 4, 4]
    rot = cam_to_world[..., :3, :3]
    trans = cam_to_world[..., :3, 3]
    world = cam.reshape(lead + (h * w, 3)) @ ops.swap(rot) + trans[..., None, :]
    return world.reshape(lead + (h, w, 3))


# --------------------------------------------------------------------------- confidence


def _percentile_value(values: Array, percentile: float) -> Array:
    """Linear-interpolated percentile of a 1-D array/tensor (numpy's default method)."""
    if not is_torch(values):
        return np.percentile(values, percentile)
    import torch

    n = values.numel()
    pos = percentile / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    # kthvalue has no element-count limit, unlike torch.quantile.
    v_lo = torch.kthvalue(values, lo + 1).values
    v_hi = torch.kthvalue(values, hi + 1).values if hi != lo else v_lo
    return v_lo + (v_hi - v_lo) * (pos - lo)


def confidence_mask(
    conf: Array,
    threshold: float | None = None,
    percentile: float | None = None,
    eps: float = 1e-5,
) -> Array:
    """Boolean mask of points to keep, as the official demos filter by confidence.

    ``percentile`` drops the lowest X % (``conf >= percentile(conf, X)`` over all finite values of
    the whole array, all frames together, like ``demo_gradio``); ``threshold`` keeps
    ``conf >= threshold`` (like ``demo_colmap``'s ``conf_thres_value``); both may be combined.
    Non-finite confidences and ``conf <= eps`` are always dropped.
    """
    conf = as_float(conf, "conf")
    ops = array_ops(conf)
    finite = ops.isfinite(conf)
    all_finite = bool(finite.all())
    mask = (conf > eps) if all_finite else finite & (conf > eps)
    if threshold is not None:
        if not math.isfinite(threshold):
            raise InputError(f"confidence threshold must be finite, found {threshold}")
        mask = mask & (conf >= threshold)
    if percentile is not None and percentile > 0:
        if not 0 <= percentile < 100:
            raise InputError(f"confidence percentile must be in [0, 100), found {percentile}")
        values = conf.reshape(-1) if all_finite else conf[finite]
        if values.shape[0] > 0:
            mask = mask & (conf >= _percentile_value(values, float(percentile)))
    return mask


# --------------------------------------------------------------------------- similarity


class UmeyamaResult(NamedTuple):
    """``dst ~= scale * R @ src + t``; ``rms`` is the root-mean-square residual in dst units."""

    scale: float
    R: Array
    t: Array
    rms: float


def umeyama_similarity(src: Array, dst: Array, with_scale: bool = True) -> UmeyamaResult:
    """Least-squares similarity (Umeyama 1991) mapping points ``src [N, 3]`` onto ``dst [N, 3]``.

    Used to move VGGT's scale-normalised frame (first camera = world) into a rig's metric frame
    from camera centres. Needs N >= 2 distinct points; with collinear points the rotation about
    their line is undetermined (a warning is logged and one valid solution is returned).
    """
    src = as_float(src, "src")
    dst = as_float(dst, "dst")
    if is_torch(src) != is_torch(dst):
        raise InputError("umeyama: src and dst must both be numpy arrays or both torch tensors")
    ops = array_ops(src)
    if is_torch(src):
        dst = dst.to(src)
    else:
        dtype = np.result_type(src.dtype, dst.dtype)
        src, dst = src.astype(dtype, copy=False), dst.astype(dtype, copy=False)
    if src.ndim != 2 or src.shape[1] != 3 or tuple(src.shape) != tuple(dst.shape):
        raise InputError(
            f"umeyama: src and dst must both be [N, 3], found {list(src.shape)} and {list(dst.shape)}"
        )
    n = src.shape[0]
    if n < 2:
        raise InputError(f"umeyama: need at least 2 point pairs, found {n}")
    if not (bool(ops.isfinite(src).all()) and bool(ops.isfinite(dst).all())):
        raise InputError("umeyama: src/dst contain non-finite values")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    var_s = float((xs * xs).sum() / n)
    if var_s <= 0.0:
        raise InputError("umeyama: all source points coincide; the scale is undetermined")
    cov = ops.swap(xd) @ xs / n
    u, d, vt = ops.svd(cov)
    sign = 1.0 if float(ops.det(u)) * float(ops.det(vt)) >= 0 else -1.0
    diag = src.new_tensor([1.0, 1.0, sign]) if is_torch(src) else np.array([1.0, 1.0, sign], src.dtype)
    rot = (u * diag) @ vt
    finfo = sys.modules["torch"].finfo if is_torch(src) else np.finfo
    eps = float(finfo(src.dtype).eps)
    if float(d[1]) <= 100 * eps * float(d[0]):
        log.warning("umeyama: source points are collinear; rotation about their line is arbitrary")
    scale = float((d * diag).sum()) / var_s if with_scale else 1.0
    t = mu_d - scale * (rot @ mu_s)
    resid = scale * (src @ ops.swap(rot)) + t - dst
    rms = math.sqrt(float((resid * resid).sum()) / n)
    return UmeyamaResult(scale, rot, t, rms)


def apply_similarity(points: Array, scale: float, R: Array, t: Array) -> Array:
    """``scale * R @ p + t`` for points ``[..., 3]``."""
    points = as_float(points, "points")
    _check_trailing(points, (3,), "points")
    ops = array_ops(points)
    return scale * (points @ ops.swap(R)) + t


def similarity_transform_extrinsics(extrinsic: Array, scale: float, R: Array, t: Array) -> Array:
    """Cam-from-world extrinsics ``[..., 3, 4]`` re-expressed in the world ``x' = scale R x + t``.

    Camera coordinates are scaled too (``x_cam' = scale x_cam``), so depth becomes metric:
    ``R_c' = R_c R^T``, ``t_c' = scale t_c - R_c R^T t``.
    """
    extrinsic = as_float(extrinsic, "extrinsic")
    _check_trailing(extrinsic, (3, 4), "extrinsic")
    ops = array_ops(extrinsic)
    rot_c = extrinsic[..., :3, :3] @ ops.swap(R)
    t_c = scale * extrinsic[..., :3, 3] - (rot_c @ t[..., None])[..., 0]
    return ops.concat([rot_c, t_c[..., None]], -1)
