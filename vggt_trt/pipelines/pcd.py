"""Images -> VGGT -> point cloud, cameras and depth on disk: the ``pcd_inference.py --source images`` pipeline.

Stages (each timed in ``summary.json``): select readable views, preprocess (to the engine's fixed input
shape, or the official crop/pad for PyTorch and dynamic graphs), inference, pose decoding, unprojection
(torch on the GPU when the runner's outputs live there, numpy otherwise), colours from the input images,
confidence filtering, optional alignment to known camera centres (Umeyama similarity, residual RMS
reported), optional voxel downsampling, then atomic writes. Poses and intrinsics files are read and
checked before inference, so a bad file fails fast and writes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import atomic_path, ensure_writable_dir, write_json_atomic
from ..errors import InputError, MissingDependencyError
from ..recon import geometry as geo, pointcloud as pc, rig
from ..recon.preprocess import load_and_preprocess_images, official_resize_hw, preprocess_to_shape, readable_images
from ..runtime.torch_runner import TorchRunner
from ..staging import Publication, StagedRun, rewrite_paths
from ..views import ViewRange
from .options import OWNED_OUTPUTS, VggtModelOptions

logger = logging.getLogger(__name__)


@dataclass
class PcdOptions(VggtModelOptions):
    """Everything one images-to-point-cloud run needs (the CLI flags, typed)."""

    images: Path
    out_dir: Path
    views: list[str] | None = None
    random_views: int | None = None
    num_cams: int | None = None
    frame: int = 0
    intrinsics: Path | None = None
    poses: Path | None = None
    poses_convention: str | None = None
    preprocess: str = "crop"
    target_size: int | None = None
    conf_threshold: float | None = None
    conf_percentile: float | None = 50.0
    mask_black_bg: bool = False
    mask_white_bg: bool = False
    voxel_size: float | None = None
    save_images: bool = True
    colmap_max_points: int = 200_000  # points3D.txt is text: ~2 s per million points; 0 writes all

    def validate(self) -> None:
        if self.backend not in ("engine", "onnx", "torch"):
            raise InputError(f"unknown backend {self.backend!r}")
        if self.backend != "torch" and self.model_path is None:
            raise InputError(f"the {self.backend} backend needs a model file")
        if self.preprocess not in ("crop", "pad"):
            raise InputError(f"--preprocess must be crop or pad, found {self.preprocess!r}")
        if self.num_cams is not None and self.num_cams < 1:
            raise InputError(f"--num_cams must be >= 1, found {self.num_cams}")
        if self.conf_percentile is not None and not 0 <= self.conf_percentile < 100:
            raise InputError(f"--conf_percentile must be in [0, 100), found {self.conf_percentile}")
        if self.voxel_size is not None and not self.voxel_size > 0:
            raise InputError(f"--voxel_size must be > 0, found {self.voxel_size}")
        if self.frame < 0:
            raise InputError(f"--frame must be >= 0, found {self.frame}")
        ensure_writable_dir(self.out_dir, "--out-dir")
        try:
            import plyfile  # noqa: F401 - points.ply is written after inference: fail before it
        except ImportError as e:
            raise MissingDependencyError("writing points.ply needs plyfile: pip install plyfile") from e


@dataclass
class Timer:
    """Wall time per stage in ms; synchronises CUDA first when the stage ran there."""

    cuda: bool = False
    stages: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self.stages[name] = self.stages.get(name, 0.0) + (now - self._t) * 1e3
        self._t = now


def select_views(scene: rig.Scene, opts: PcdOptions, needed: int | None, views: ViewRange | None = None
                 ) -> tuple[list[str], list[Path], list[dict[str, str]]]:
    """:func:`pick_views` with the view flags of ``opts`` (``--views``, ``--random_views``, ``--seed``, ``--frame``)."""
    return pick_views(scene, needed, views, names=opts.views, random_views=opts.random_views, seed=opts.seed,
                      frame=opts.frame)


def pick_views(scene: rig.Scene, needed: int | None, views: ViewRange | None = None, *,
               names: Sequence[str] | None = None, random_views: int | None = None, seed: int = 0, frame: int = 0
               ) -> tuple[list[str], list[Path], list[dict[str, str]]]:
    """Readable frame ``frame`` of up to ``needed`` cameras; broken images are reported and replaced if allowed.

    One frame per camera of a per-camera scene, one view per image of a flat one. With a model that takes a
    range of view counts (``views``) and no fixed count asked for, every readable camera up to ``views.max`` is
    used, and cameras that drop out (unreadable, no such frame) are left out as long as ``views.min`` remain;
    with neither, up to 8 cameras.
    """
    order, explicit = rig.candidate_views(scene, names, random_views, seed)
    flexible = views is not None and needed is None
    default = views.max if flexible else 8
    want = needed or (len(order) if explicit else min(random_views or default, len(order)))
    if explicit and len(order) != want:
        raise InputError(f"--views names {len(order)} cameras but the model takes {want} views (--num_cams)")
    if views is not None and want not in views:
        raise InputError(f"{want} views asked for (--views/--num_cams/--random_views), but the model takes "
                         f"{views.min} to {views.max} views")
    least = views.min if flexible else want
    chosen, paths, skipped = [], [], []
    for name in order:
        if len(chosen) == want:
            break
        frames = scene.frames[name]
        if frame >= len(frames):
            skipped.append({"view": name, "reason": f"no frame {frame} (camera has {len(frames)})"})
            continue
        ok, bad = readable_images([frames[frame]])
        if bad:
            skipped.append({"view": name, "image": str(bad[0][0]), "reason": bad[0][1]})
            logger.warning("view %s: unreadable image %s", name, bad[0][0])
            continue
        chosen.append(name)
        paths.append(ok[0])
    if len(chosen) < least:
        broken = "; ".join(f"{s['view']}: {s.get('image', '')} {s['reason']}" for s in skipped)
        raise InputError(f"{scene.root}: only {len(chosen)} readable views, {least} needed (--num_cams)"
                         + (f"; skipped {broken}" if broken else ""))
    if len(chosen) < want:
        logger.warning("using %d views instead of %d: %d cameras dropped out (the model takes %d to %d views)",
                       len(chosen), want, want - len(chosen), views.min, views.max)
    return chosen, paths, skipped


def _source_sizes(paths: Sequence[Path]) -> list[tuple[int, int]]:
    from PIL import Image

    sizes = []
    for p in paths:
        with Image.open(p) as img:
            sizes.append(img.size)  # (width, height)
    return sizes


def preprocess(paths: Sequence[Path], mode: str, fixed_hw: tuple[int, int] | None, target_size: int
               ) -> tuple[np.ndarray, list[tuple[tuple[float, float], tuple[float, float]]]]:
    """Images ``[S,3,H,W]`` and, per image, the (scale, offset) mapping source to model pixels (edge coords)."""
    sizes = _source_sizes(paths)
    if fixed_hw and not (mode == "pad" and fixed_hw[0] == fixed_hw[1]):
        if mode == "pad":
            raise InputError(f"--preprocess pad needs a square input; the engine takes {fixed_hw[0]}x{fixed_hw[1]}")
        h, w = fixed_hw
        maps = []
        for sw, sh in sizes:
            s = max(w / sw, h / sh)
            maps.append(((s, s), (-(sw - w / s) / 2 * s, -(sh - h / s) / 2 * s)))
        return preprocess_to_shape(paths, h, w), maps
    target = fixed_hw[0] if fixed_hw else target_size
    images = load_and_preprocess_images(paths, mode=mode, target_size=target)
    big_h, big_w = images.shape[-2:]
    maps = []
    for sw, sh in sizes:
        nh, nw = official_resize_hw(sw, sh, mode, target)
        top = left = 0.0
        h, w = nh, nw
        if mode == "crop" and nh > target:
            top, h = -float((nh - target) // 2), target
        if mode == "pad":
            top, left, h, w = (target - nh) // 2, (target - nw) // 2, target, target
        top += (big_h - h) // 2
        left += (big_w - w) // 2
        maps.append(((nw / sw, nh / sh), (float(left), float(top))))
    if fixed_hw and images.shape[-2:] != tuple(fixed_hw):
        raise InputError(f"pad preprocessing gave {list(images.shape[-2:])}, the engine takes {list(fixed_hw)}")
    return images, maps


def _np(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def run_pcd(opts: PcdOptions, runner: Any = None) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary that is also written to ``out_dir/summary.json``.

    ``runner``: an already active runner to reuse (benchmarks, repeated runs); otherwise one is made from
    ``opts`` and released at the end.
    """
    import contextlib

    opts.validate()
    scene = rig.discover_scene(opts.images)
    timer = Timer()
    with contextlib.nullcontext(runner) if runner is not None else opts.make_runner() as runner:
        timer.lap("load_model")
        meta = runner.input_metadata()
        if len(meta) != 1 or len(meta[0].shape) != 4:
            raise InputError(f"{runner.name}: expected one [S,3,H,W] input, found {[m.to_dict() for m in meta]}")
        s_fixed, _, h_fixed, w_fixed = meta[0].shape
        if s_fixed and opts.num_cams and opts.num_cams != s_fixed:
            raise InputError(f"--num_cams {opts.num_cams}, but {runner.name} takes exactly {s_fixed} views")
        needed = s_fixed or opts.num_cams
        names, paths, skipped = select_views(scene, opts, needed, runner.view_range())
        # known poses / intrinsics are checked before any inference or output
        centers = rig.load_pose_centers(opts.poses, names, opts.poses_convention) if opts.poses else None
        known_k = rig.load_intrinsics(opts.intrinsics, names) if opts.intrinsics else None
        if centers is not None and len(names) < 2:
            raise InputError("aligning to known poses needs at least 2 cameras")
        timer.lap("select")
        target = opts.target_size or (runner.config.img_size if isinstance(runner, TorchRunner) else 518)
        fixed_hw = (h_fixed, w_fixed) if h_fixed and w_fixed else None
        images, maps = preprocess(paths, opts.preprocess, fixed_hw, target)
        timer.lap("preprocess")
        out = runner.infer_device({meta[0].name: images})
        cuda = runner.device.startswith("cuda")
        timer.cuda = cuda
        timer.lap("inference")
        if not cuda:
            out = {k: _np(v) for k, v in out.items()}
    hw = tuple(images.shape[-2:])
    extr, intr = geo.pose_encoding_to_extri_intri(out["pose_enc"][0], hw)
    if known_k is not None:
        mapped = np.stack([rig.map_intrinsics(known_k[n], *m) for n, m in zip(names, maps)]).astype(np.float32)
        intr = intr.new_tensor(mapped) if cuda else mapped
    depth, conf = out["depth"][0, ..., 0], out["depth_conf"][0]
    timer.lap("decode")
    world = geo.unproject_depth_map_to_point_map(depth, extr, intr)
    timer.lap("unproject")
    if cuda:
        import torch

        colours = pc.colors_from_images(torch.from_numpy(images).to(depth.device))
    else:
        colours = pc.colors_from_images(images)
    mask = None
    if opts.mask_black_bg or opts.mask_white_bg:
        c = colours.int() if cuda else colours.astype(np.int32)
        if opts.mask_black_bg:
            mask = c.sum(-1) >= 16
        if opts.mask_white_bg:
            white = ~((c[..., 0] > 240) & (c[..., 1] > 240) & (c[..., 2] > 240))
            mask = white if mask is None else mask & white
    timer.lap("colour")
    xyz, rgb, pconf = pc.filter_points(world, colours, conf, opts.conf_threshold, opts.conf_percentile, mask)
    xyz, rgb, pconf = _np(xyz), _np(rgb), _np(pconf)
    extr_np, intr_np = _np(extr).astype(np.float64), _np(intr).astype(np.float64)
    n_total, n_kept = int(np.prod(depth.shape)), int(xyz.shape[0])
    timer.lap("filter")
    if n_kept == 0:
        low, high = float(_np(conf).min()), float(_np(conf).max())
        raise InputError(f"no point is left after the filters (confidence {low:.4g} .. {high:.4g}, "
                         f"--conf-threshold {opts.conf_threshold}, --conf-percentile {opts.conf_percentile}, "
                         f"--mask-black-bg {opts.mask_black_bg}, --mask-white-bg {opts.mask_white_bg}); nothing "
                         "was written")
    alignment = None
    if centers is not None:
        pred = geo.camera_centers(extr_np)
        known = np.stack([centers[n] for n in names])
        fit = geo.umeyama_similarity(pred, known)
        residuals = np.linalg.norm(geo.apply_similarity(pred, fit.scale, fit.R, fit.t) - known, axis=-1)
        xyz = geo.apply_similarity(xyz.astype(np.float64), fit.scale, fit.R, fit.t).astype(np.float32)
        extr_np = geo.similarity_transform_extrinsics(extr_np, fit.scale, fit.R, fit.t)
        alignment = {"source": str(opts.poses), "scale": float(fit.scale), "rotation": np.asarray(fit.R).tolist(),
                     "translation": np.asarray(fit.t).tolist(), "residual_rms": float(fit.rms),
                     "residual_per_camera": dict(zip(names, residuals.tolist())), "frame": "rig (known poses)"}
        logger.info("aligned to %d known camera centres: scale %.4g, residual RMS %.4g", len(names), fit.scale,
                    fit.rms)
        timer.lap("align")
    n_voxel = None
    if opts.voxel_size:
        xyz, rgb, pconf = pc.voxel_downsample(xyz, rgb, pconf, opts.voxel_size)
        n_voxel = int(xyz.shape[0])
        timer.lap("voxel")
    # every output is staged and published together (vggt_trt/staging.py): a failed run leaves the folder as it
    # was; outputs of an earlier run that this one does not write (e.g. --no-save-images) are moved aside
    with StagedRun(Path(opts.out_dir), "pcd", owns=OWNED_OUTPUTS.__contains__) as run:
        out_dir = run.staging
        image_names = [f"{n}.png" for n in names]
        files = {"ply": pc.write_ply(out_dir / "points.ply", xyz, rgb, pconf),
                 "cameras": pc.write_cameras_json(out_dir / "cameras.json", extr_np, intr_np, image_names, hw)}
        timer.lap("write_ply")
        sparse = np.arange(xyz.shape[0])
        if 0 < opts.colmap_max_points < xyz.shape[0]:
            sparse = np.sort(np.random.default_rng(0).choice(xyz.shape[0], opts.colmap_max_points, replace=False))
            logger.info("COLMAP points3D.txt: %d of %d points (uniform sample; --colmap_max_points 0 writes all)",
                        sparse.size, xyz.shape[0])
        colmap = pc.write_colmap_text(out_dir / "sparse" / "0", extr_np, intr_np, image_names, hw, xyz[sparse],
                                      rgb[sparse])
        files.update({f"colmap_{k}": v for k, v in colmap.items()})
        timer.lap("write_colmap")
        with atomic_path(out_dir / "depth.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, depth=_np(depth).astype(np.float32), depth_conf=_np(conf).astype(np.float32),
                         extrinsic=extr_np, intrinsic=intr_np, image_names=np.asarray(names),
                         metric_scale=np.float64(alignment["scale"] if alignment else 1.0))
        files["depth"] = out_dir / "depth.npz"
        if opts.save_images:
            files["images"] = _save_images(out_dir / "images", image_names, images)
        timer.lap("write")
        summary = {
            "scene": {"root": str(scene.root), "layout": scene.layout, "frame": opts.frame, "views": names,
                      "images": [str(p) for p in paths], "skipped": skipped},
            "model": runner.info(), "input_shape": list(images.shape),
            "intrinsics": "file: " + str(opts.intrinsics) if known_k is not None else "predicted by VGGT",
            "frame": alignment["frame"] if alignment else "VGGT (first camera = world, scale-normalised)",
            "points": {"total": n_total, "after_filter": n_kept, "after_voxel": n_voxel, "written": int(xyz.shape[0])},
            "filter": {"conf_threshold": opts.conf_threshold, "conf_percentile": opts.conf_percentile,
                       "mask_black_bg": opts.mask_black_bg, "mask_white_bg": opts.mask_white_bg,
                       "voxel_size": opts.voxel_size},
            "alignment": alignment, "postprocess_device": "cuda (torch)" if cuda else "cpu (numpy)",
            "timings_ms": {k: round(v, 3) for k, v in timer.stages.items()},
            "files": {k: str(run.final_path(v)) for k, v in files.items()},
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        }
        write_json_atomic(run.staging / "summary.json", summary)
        run.publish(lambda publication: _write_summary(run, summary, publication))
    logger.info("point cloud: %d of %d points kept, written to %s", summary["points"]["written"], n_total,
                opts.out_dir)
    return summary


def _write_summary(run: StagedRun, summary: dict[str, Any], publication: Publication) -> None:
    """summary.json in the staging folder, with what publication replaces (``output_folder``)."""
    summary["output_folder"] = rewrite_paths(publication.to_dict(), str(run.staging), str(run.out_dir))
    write_json_atomic(run.staging / "summary.json", summary)


def _save_images(folder: Path, names: Sequence[str], images: np.ndarray) -> Path:
    """The preprocessed views as PNG: the images the cameras and COLMAP model describe."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    arr = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    for name, img in zip(names, arr):
        with atomic_path(folder / name) as tmp:
            Image.fromarray(img).save(tmp, format="PNG")
    return folder


def options_from_dict(values: dict[str, Any]) -> PcdOptions:
    """PcdOptions from a flat dict (unknown keys are an error, paths are converted)."""
    known = {f for f in PcdOptions.__dataclass_fields__}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"unknown pcd options {unknown}")
    for key in ("images", "out_dir", "model_path", "weights", "intrinsics", "poses"):
        if values.get(key) is not None:
            values[key] = Path(os.fspath(values[key]))
    return PcdOptions(**values)
