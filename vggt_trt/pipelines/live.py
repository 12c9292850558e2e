"""Live point clouds: VGGT bootstraps cameras and depth scale, Depth Anything gives per-frame depth per camera.

Per batch (one lock-step frame per camera, :mod:`vggt_trt.pipelines.sources`): preprocess to the model size, Depth
Anything disparity per camera (worker pool), per-camera depth ``1 / (scale * disparity + shift)``,
unprojection with the camera's pose, fusion into a bounded voxel-hashed map.

Calibration. Depth Anything V2 (relative) predicts affine-invariant *inverse* depth, so the fit is done in
disparity space: ``1 / d_vggt = scale * disp_da + shift`` on VGGT's confident pixels (confidence above
``conf_percentile``), solved by iteratively reweighted least squares with Huber weights (threshold 1.345
robust sigmas from the MAD). A fit with ``scale <= 0`` is rejected. Fits are smoothed over time with an EMA
(``ema``: weight of the new fit). VGGT runs on the first batch (bootstrap) and every ``vggt_every`` batches
after it (refresh, brought into the map frame by a similarity fit of camera centres). Scale/shift, poses and
intrinsics go to ``--per_camera_calib`` (JSON, written atomically) and are reused by the next run: the
stored values seed the EMA, and when every camera has stored cameras at the same input size, the VGGT
bootstrap is skipped.

Frames: the map frame is VGGT's (first bootstrap camera = world, scale-normalised), or the rig frame when
``--poses`` gives known camera centres (Umeyama similarity, as for the images source); ``--intrinsics``
replaces VGGT's intrinsics. ``--initial_map PLY`` seeds the map (in the map frame).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..atomic import ensure_writable_dir, write_json_atomic
from ..errors import InputError
from ..recon import geometry as geo, rig
from ..recon.frames import FrameUploader, frames_to_model_input
from ..recon.pointcloud import colors_from_images, read_ply, write_cameras_json, write_ply
from ..recon.voxel_map import VoxelMap
from ..staging import Publication, claim_folder
from .background import BackgroundJob, Prefetcher
from .options import OWNED_OUTPUTS, VggtModelOptions
from .sources import LockstepSource, make_cameras, select_cameras

logger = logging.getLogger(__name__)

CALIB_FORMAT = "vggt-trt per-camera depth calibration v1"


# --------------------------------------------------------------------------- calibration


@dataclass
class Fit:
    scale: float
    shift: float
    rms: float
    inliers: float
    n: int


def fit_scale_shift(disp: np.ndarray, target_inv_depth: np.ndarray, iters: int = 10) -> Fit:
    """Robust ``target ≈ scale * disp + shift`` (IRLS with Huber weights); inputs are 1-D, finite."""
    x, y = np.asarray(disp, np.float64), np.asarray(target_inv_depth, np.float64)
    if x.size < 10:
        raise InputError(f"too few confident pixels to fit scale/shift ({x.size})")
    a = np.stack([x, np.ones_like(x)], 1)
    w = np.ones_like(x)
    coef = np.zeros(2)
    for _ in range(iters):
        sw = np.sqrt(w)
        coef, *_ = np.linalg.lstsq(a * sw[:, None], y * sw, rcond=None)
        r = y - a @ coef
        sigma = 1.4826 * np.median(np.abs(r - np.median(r))) + 1e-12
        delta = 1.345 * sigma
        w = np.minimum(1.0, delta / np.maximum(np.abs(r), 1e-12))
    r = y - a @ coef
    return Fit(float(coef[0]), float(coef[1]), float(np.sqrt(np.mean(r ** 2))), float(np.mean(w >= 1.0)), int(x.size))


@dataclass
class CameraCalib:
    scale: float | None = None
    shift: float | None = None
    updates: int = 0
    rejected: int = 0
    rms: float | None = None
    median_depth: float | None = None
    max_depth: float | None = None
    extrinsic: list | None = None  # 3x4 cam-from-world, map frame
    intrinsic: list | None = None  # 3x3, model input pixels

    def update(self, fit: Fit, ema: float) -> None:
        if self.scale is None or self.shift is None:
            self.scale, self.shift = fit.scale, fit.shift
        else:
            self.scale = (1 - ema) * self.scale + ema * fit.scale
            self.shift = (1 - ema) * self.shift + ema * fit.shift
        self.updates, self.rms = self.updates + 1, fit.rms


def load_calibration(path: Path | None) -> tuple[dict[str, CameraCalib], dict[str, Any]]:
    if path is None or not Path(path).is_file():
        return {}, {}
    import json

    try:
        doc = json.loads(Path(path).read_text())
        cams = {n: CameraCalib(**c) for n, c in doc["cameras"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"--per_camera_calib {path}: not a calibration file ({exc})") from exc
    logger.info("per-camera calibration %s: %d cameras (%s)", path, len(cams), ", ".join(cams))
    return cams, doc


def save_calibration(path: Path, calibs: dict[str, CameraCalib], meta: dict[str, Any]) -> Path:
    doc = {"format": CALIB_FORMAT, "model": "1 / depth = scale * depth_anything_disparity + shift", **meta,
           "updated": time.strftime("%Y-%m-%dT%H:%M:%S"), "cameras": {n: asdict(c) for n, c in calibs.items()}}
    return write_json_atomic(path, doc)


# --------------------------------------------------------------------------- options and helpers


@dataclass
class LiveOptions(VggtModelOptions):
    """Everything one live run needs (the ``pcd_inference.py --source videos|webcams`` flags, typed)."""

    source: str
    out_dir: Path
    images: Path | None = None
    videos: Path | None = None
    webcams: list[str] | None = None
    num_cams: int | None = None
    views: list[str] | None = None
    random_views: int | None = None
    frame_step: int = 1
    max_batches: int | None = None
    min_cams: int | None = None
    stall_timeout: float = 5.0
    target_size: int | None = None
    vggt_every: int = 0
    depth_model: str = "depth-anything/Depth-Anything-V2-Small-hf"
    depth_engine_dir: Path | None = None
    depth_backend: str = "auto"
    depth_workers: int | None = None
    depth_precision: str = "fp32"
    depth_random_init: bool = False
    depth_allow_download: bool = False
    depth_compile: bool = False
    intrinsics: Path | None = None
    poses: Path | None = None
    poses_convention: str | None = None
    per_camera_calib: Path | None = None
    initial_map: Path | None = None
    conf_percentile: float = 50.0
    ema: float = 0.3
    voxel_size: float | None = None
    max_voxels: int = 2_000_000
    pixel_stride: int = 1
    save_batches: bool = True
    viewer: Any = None  # a vggt_trt.view.live.LiveViewer the map is published to after every batch

    def validate(self) -> None:
        if self.backend not in ("engine", "onnx", "torch") or (self.backend != "torch" and self.model_path is None):
            raise InputError(f"VGGT backend {self.backend!r} needs a model file (--vggt_engine / --onnx)")
        if not 0 < self.ema <= 1 or not 0 <= self.conf_percentile < 100 or self.pixel_stride < 1:
            raise InputError("need 0 < ema <= 1, 0 <= conf_percentile < 100 and pixel_stride >= 1")
        if self.vggt_every < 0 or (self.voxel_size is not None and not self.voxel_size > 0):
            raise InputError("--vggt_every must be >= 0 and --voxel_size > 0")
        ensure_writable_dir(self.out_dir, "--out-dir")
        if self.initial_map is not None and not Path(self.initial_map).is_file():
            raise InputError(f"--initial_map: file not found: {self.initial_map}")


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, np.float64)
    return {"n": int(a.size), "median": float(np.median(a)), "mean": float(a.mean()),
            "p90": float(np.percentile(a, 90)), "total": float(a.sum())}


def memory_use(device: str) -> dict[str, float | None]:
    """This process's resident host memory and the device memory torch holds, in MiB."""
    import torch

    try:
        rss = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        rss = None
    gpu = torch.cuda.memory_allocated(device) / 2**20 if device.startswith("cuda") else None
    return {"host_rss_mib": rss, "gpu_allocated_mib": gpu}


def map_device(device: str) -> str:
    """Where unprojection and fusion run: the GPU when the run uses one, else the host."""
    import torch

    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        return device if device.startswith("cuda") else "cuda"
    return "cpu"


# --------------------------------------------------------------------------- the loop


@dataclass
class _State:
    names: list[str]
    hw: tuple[int, int] = (0, 0)
    calibs: dict[str, CameraCalib] = field(default_factory=dict)
    alignment: dict[str, Any] | None = None
    vggt_runs: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, list[float]] = field(default_factory=dict)
    frames: int = 0
    map_sizes: list[int] = field(default_factory=list)
    memory: dict[str, dict[str, float | None]] = field(default_factory=dict)
    batch_end_s: list[float] = field(default_factory=list)

    def lap(self, stage: str, t0: float) -> float:
        now = time.perf_counter()
        self.timings.setdefault(stage, []).append((now - t0) * 1e3)
        return now


class LiveSession:
    """One live run; :meth:`run` iterates the source until it ends and returns the summary."""

    def __init__(self, opts: LiveOptions, cameras: Sequence[Any] | None = None,
                 capture_factory: Callable[[Any], Any] | None = None, vggt_runner: Any = None,
                 depth_factory: Callable[[], Any] | None = None) -> None:
        opts.validate()
        self.o, self.factory = opts, capture_factory
        cams = cameras if cameras is not None else make_cameras(opts.source, images=opts.images, videos=opts.videos,
                                                                webcams=opts.webcams)
        self.cameras = select_cameras(cams, opts.num_cams, opts.views, opts.random_views, opts.seed)
        self.vggt = vggt_runner if vggt_runner is not None else opts.make_runner()
        self.depth_factory = depth_factory
        self.calib_path = Path(opts.per_camera_calib or Path(opts.out_dir) / "per_camera_calib.json")
        self.output_folder: Publication | None = None
        self.st = _State([c.name for c in self.cameras])
        self.map: VoxelMap | None = None
        self.map_device = map_device(opts.device)
        self.viewer = opts.viewer
        self._published_cameras: list[Any] = []

    # -- VGGT reference depth, in the map frame
    def _vggt(self, names: list[str], images: Any, maps: list[tuple], batch: int) -> dict[str, Any] | None:
        meta = self.vggt.input_metadata()[0]
        accepted = self.vggt.view_range()
        if accepted is not None and len(names) not in accepted:
            logger.info("batch %d: VGGT refresh skipped: the model takes %s views, %d cameras left", batch,
                        accepted.min if accepted.min == accepted.max else accepted.text(), len(names))
            return None
        feed = images if self.vggt.backend == "torch" else images.cpu().numpy()
        out = self.vggt.infer({meta.name: feed})
        out = {k: np.asarray(v) for k, v in out.items()}
        extr, intr = geo.pose_encoding_to_extri_intri(out["pose_enc"][0].astype(np.float64), self.st.hw)
        depth, conf = out["depth"][0, ..., 0].astype(np.float64), out["depth_conf"][0]
        if self.o.intrinsics:
            known = rig.load_intrinsics(self.o.intrinsics, names)
            intr = np.stack([rig.map_intrinsics(known[n], *m) for n, m in zip(names, maps)])
        stored = [n for n in names if self.st.calibs.get(n) and self.st.calibs[n].extrinsic is not None]
        ref = None
        if self.o.poses and not stored:
            centers = rig.load_pose_centers(self.o.poses, names, self.o.poses_convention)
            ref = np.stack([centers[n] for n in names])
        elif len(stored) == len(names) and len(names) >= 2:
            ref = np.stack([geo.camera_centers(np.asarray(self.st.calibs[n].extrinsic)) for n in names])
        elif stored:
            logger.info("batch %d: VGGT refresh skipped: %d cameras are too few to align", batch, len(names))
            return None
        scale, info = 1.0, {"batch": batch, "views": names, "frame": "VGGT bootstrap"}
        if ref is not None:
            fit = geo.umeyama_similarity(geo.camera_centers(extr), ref)
            extr = geo.similarity_transform_extrinsics(extr, fit.scale, np.asarray(fit.R), np.asarray(fit.t))
            scale = float(fit.scale)
            info.update(frame="aligned to " + ("--poses" if not stored else "stored cameras"), scale=scale,
                        residual_rms=float(fit.rms))
        self.st.vggt_runs.append({**info, "ms": self.vggt.last_inference_ms})
        return {"extr": extr, "intr": intr, "depth": depth * scale, "conf": conf, "stored": bool(stored)}

    def _fit(self, names: list[str], disp: np.ndarray, ref: dict[str, Any]) -> None:
        rng = np.random.default_rng(self.o.seed)
        keep = geo.confidence_mask(ref["conf"], percentile=self.o.conf_percentile or None)
        for i, n in enumerate(names):
            c = self.st.calibs.setdefault(n, CameraCalib())
            if not ref["stored"] or c.extrinsic is None:
                c.extrinsic, c.intrinsic = ref["extr"][i].tolist(), ref["intr"][i].tolist()
            d = ref["depth"][i]
            m = keep[i] & np.isfinite(d) & (d > 1e-6) & np.isfinite(disp[i])
            idx = np.flatnonzero(m)
            if idx.size > 20000:
                idx = rng.choice(idx, 20000, replace=False)
            try:
                fit = fit_scale_shift(disp[i].reshape(-1)[idx], 1.0 / d.reshape(-1)[idx])
            except InputError as exc:
                fit = None
                logger.warning("camera %s: no depth fit (%s)", n, exc)
            if fit is None or not fit.scale > 0:
                c.rejected += 1
                if fit is not None:
                    logger.warning("camera %s: fit rejected (scale %.3g <= 0)", n, fit.scale)
                continue
            c.update(fit, self.o.ema)
            good = d[m]
            c.median_depth, c.max_depth = float(np.median(good)), float(2.0 * np.percentile(good, 99))
            logger.debug("camera %s: scale %.4g shift %.4g (rms %.3g, %d px)", n, c.scale, c.shift, fit.rms, fit.n)

    def _points(self, names: list[str], images: Any, disp: Any) -> tuple[Any, Any]:
        """World points and colours of every calibrated camera at once, as tensors on the images' device."""
        import torch

        dev = images.device
        cams = [(i, self.st.calibs.get(n)) for i, n in enumerate(names)]
        cams = [(i, c) for i, c in cams if c is not None and c.scale is not None and c.extrinsic is not None]
        if not cams:
            return torch.empty((0, 3), device=dev), torch.empty((0, 3), dtype=torch.uint8, device=dev)
        idx = torch.tensor([i for i, _ in cams], device=dev)

        def column(values: list[float]) -> Any:
            return torch.tensor(values, dtype=torch.float32, device=dev)[:, None, None]

        scale, shift = column([c.scale for _, c in cams]), column([c.shift for _, c in cams])
        max_depth = column([c.max_depth or float("inf") for _, c in cams])
        inv = scale * disp[idx] + shift
        nan = torch.full_like(inv, float("nan"))
        depth = torch.where(inv > 1e-6, 1.0 / inv.clamp(min=1e-6), nan)
        depth = torch.where(depth > max_depth, nan, depth)
        world = geo.unproject_depth_map_to_point_map(
            depth, torch.tensor([c.extrinsic for _, c in cams], dtype=torch.float32, device=dev),
            torch.tensor([c.intrinsic for _, c in cams], dtype=torch.float32, device=dev))
        s = self.o.pixel_stride
        world = world[:, ::s, ::s].reshape(-1, 3)
        colours = colors_from_images(images[idx])[:, ::s, ::s].reshape(-1, 3)
        ok = torch.isfinite(world).all(dim=1)
        return world[ok], colours[ok]

    def _model_hw(self, frame: np.ndarray) -> tuple[int, int]:
        meta = self.vggt.input_metadata()[0]
        if meta.shape[2] and meta.shape[3]:
            return int(meta.shape[2]), int(meta.shape[3])
        target = self.o.target_size or getattr(getattr(self.vggt, "model", None), "cfg", None).img_size
        fh, fw = frame.shape[:2]
        return min(target, max(14, int(round(target * fh / fw / 14)) * 14)), target

    def _depth_pool(self, old: dict[str, Any]) -> Any:
        # lazy: Depth Anything pulls in the conversion pipeline (torch, onnx) that only the live loop needs
        from .depth_anything import DepthPool, depth_runner_factory

        o, st = self.o, self.st
        if old.get("input_hw") and list(old["input_hw"]) != list(st.hw):
            logger.warning("%s was made for input %s, this run uses %s: starting afresh", self.calib_path,
                           old["input_hw"], list(st.hw))
            st.calibs = {}
        factory = self.depth_factory or depth_runner_factory(
            o.depth_model, o.depth_engine_dir, st.hw[0], st.hw[1], o.depth_backend, o.device, o.depth_precision,
            o.depth_random_init, o.seed, o.depth_allow_download, o.depth_compile)
        return DepthPool(factory, o.depth_workers or 1)

    def _new_map(self) -> VoxelMap:
        o = self.o
        med = [c.median_depth for c in self.st.calibs.values() if c.median_depth]
        vmap = VoxelMap(o.voxel_size or (float(np.median(med)) / 100 if med else 0.01), o.max_voxels,
                        device=self.map_device)
        if o.initial_map:
            seed = read_ply(o.initial_map)
            vmap.insert(seed["xyz"], seed.get("rgb", np.full((len(seed["xyz"]), 3), 128)), -1)
            logger.info("initial map %s: %d points -> %d voxels", o.initial_map, len(seed["xyz"]), len(vmap))
        return vmap

    def _apply_refresh(self, done: Any) -> None:
        """Fit the cameras to a finished background VGGT refresh (names, that batch's disparity, reference)."""
        if done is not None and done[2] is not None:
            self._fit(*done)

    def _claim_folder(self) -> None:
        """Before the run's first write: outputs of an earlier run in ``--out-dir`` (images or live) move aside
        into ``.replaced-live-*`` (the calibration file stays: it is this run's input and output)."""
        if self.output_folder is None:
            self.output_folder = claim_folder(Path(self.o.out_dir), "live", OWNED_OUTPUTS.__contains__,
                                              keep=[self.calib_path.name])

    def _publish(self, active: list[str]) -> None:
        """Offer the map to the viewer (it takes it at its rate, drops, never queues); frusta only when they change."""
        self.viewer.offer_map(self.map.means)
        posed = [n for n in self.st.names if self.st.calibs.get(n) and self.st.calibs[n].extrinsic is not None]
        signature = [(n, n in active, self.st.calibs[n].extrinsic) for n in posed]
        if posed and signature != self._published_cameras:
            self._published_cameras = signature
            self.viewer.set_cameras(np.array([self.st.calibs[n].extrinsic for n in posed]),
                                    np.array([self.st.calibs[n].intrinsic for n in posed]), posed,
                                    [n in active for n in posed], self.st.hw)

    def run(self) -> dict[str, Any]:
        o, st = self.o, self.st
        out = Path(o.out_dir)
        st.calibs, old = load_calibration(self.calib_path)
        batches_written: list[str] = []
        t_start = time.perf_counter()
        uploader = FrameUploader(self.map_device)
        source = LockstepSource(self.cameras, o.frame_step, o.max_batches, o.min_cams, o.stall_timeout,
                                capture_factory=self.factory)
        with contextlib.ExitStack() as stack:
            stack.enter_context(self.vggt if not self.vggt.is_active else contextlib.nullcontext(self.vggt))
            stack.enter_context(source)
            batches = stack.enter_context(
                Prefetcher(source, lambda b: uploader.upload([b.frames[n].image for n in b.names])))
            refresh = stack.enter_context(BackgroundJob(self.map_device))
            pool = None
            t = st.lap("startup", t_start)
            t_loop = t
            for batch, (frames, ready) in batches:
                t = t_batch = st.lap("read", t)
                names = batch.names
                st.frames += len(names)
                if pool is None:
                    st.hw = self._model_hw(batch.frames[names[0]].image)
                    pool = stack.enter_context(self._depth_pool(old))
                    t = st.lap("startup", t)
                uploader.wait(frames, ready)
                images, crops = frames_to_model_input(frames, *st.hw)
                maps = [c.pixel_map for c in crops]
                t = st.lap("preprocess", t)
                self._apply_refresh(refresh.poll())
                complete = all(st.calibs.get(n) and st.calibs[n].extrinsic is not None for n in st.names)
                if batch.index == 0 and not complete and st.calibs:
                    logger.warning("%s lacks cameras for %s: bootstrapping afresh", self.calib_path,
                                   sorted(set(st.names) - set(st.calibs)))
                    st.calibs = {}
                bootstrap = batch.index == 0 and not complete
                ref = None
                if bootstrap:
                    ref = self._vggt(names, images, maps, batch.index)
                    t = st.lap("vggt", t)
                elif batch.index == 0:
                    logger.info("VGGT bootstrap skipped: %s has cameras and scale/shift for all %d cameras",
                                self.calib_path, len(st.names))
                disp = pool.infer(images)
                t = st.lap("depth", t)
                if ref is not None:
                    self._fit(names, disp.cpu().numpy(), ref)
                    t = st.lap("fit", t)
                elif o.vggt_every and batch.index % o.vggt_every == 0:
                    job = (lambda n=names, i=images, d=disp, m=maps, b=batch.index:
                           (n, d.cpu().numpy(), self._vggt(n, i, m, b)))
                    if not refresh.submit(job, (images, disp)):
                        logger.info("batch %d: VGGT refresh skipped: the previous one is still running", batch.index)
                if self.map is None:
                    self.map = self._new_map()
                xyz, rgb = self._points(names, images, disp)
                t = st.lap("unproject", t)
                self.map.insert(xyz, rgb, batch.index)
                st.map_sizes.append(len(self.map))
                t = st.lap("fuse", t)
                if self.viewer is not None:
                    self._publish(names)
                if o.save_batches:
                    self._claim_folder()
                    batches_written.append(str(write_ply(out / "batches" / f"batch_{batch.index:05d}.ply",
                                                         xyz.cpu().numpy(), rgb.cpu().numpy())))
                    t = st.lap("write", t)
                st.timings.setdefault("batch", []).append((t - t_batch) * 1e3)
                st.batch_end_s.append(round(t - t_loop, 5))
                if batch.index == 0:
                    st.memory["start"] = memory_use(self.map_device)
                logger.info("batch %d: %d cameras, skew %.1f ms, %d points, map %d voxels", batch.index, len(names),
                            batch.skew_ms, len(xyz), len(self.map))
            self._apply_refresh(refresh.poll(wait=True))
            loop_s = time.perf_counter() - t_loop
            if self.viewer is not None:
                self.viewer.flush()
            st.memory["end"] = memory_use(self.map_device)
            depth_info = pool.info() if pool else None
            vggt_info = self.vggt.info()
        return self._finish(source, loop_s, batches_written, depth_info, vggt_info)

    def _finish(self, source: Any, loop_s: float, batches_written: list[str], depth_info: Any,
                vggt_info: Any) -> dict[str, Any]:
        o, st, out = self.o, self.st, Path(self.o.out_dir)
        if self.map is None:
            raise InputError(f"no batch was read: {source.stop_reason or 'the source delivered nothing'}; "
                             f"camera events: {[e.to_dict() for e in source.events]}")
        self._claim_folder()
        files = {"map": str(write_ply(out / "map.ply", *self.map.points()))}
        meta = {"input_hw": list(st.hw), "vggt": vggt_info.get("name"), "depth_model": o.depth_model,
                "frame": (st.vggt_runs[0]["frame"] if st.vggt_runs else "from the calibration file")}
        files["per_camera_calib"] = str(save_calibration(self.calib_path, st.calibs, meta))
        posed = [n for n in st.names if st.calibs.get(n) and st.calibs[n].extrinsic is not None]
        if posed:
            files["cameras"] = str(write_cameras_json(out / "cameras.json",
                                                      np.array([st.calibs[n].extrinsic for n in posed]),
                                                      np.array([st.calibs[n].intrinsic for n in posed]), posed,
                                                      [st.hw] * len(posed)))
        n = source.batches
        per_batch = {k: v for k, v in st.timings.items() if k != "startup"}
        summary = {
            "source": {**source.report(), "kind": o.source}, "batches": n, "loop_s": round(loop_s, 4),
            "batches_per_s": n / loop_s if loop_s > 0 else None,
            "frames_per_s": st.frames / loop_s if loop_s > 0 else None,
            "latency_ms": {k: _stats(v) for k, v in per_batch.items()},
            "startup_ms": sum(st.timings.get("startup", [0.0])), "input_hw": list(st.hw),
            "vggt": {"runner": vggt_info, "runs": st.vggt_runs, "every": o.vggt_every},
            "depth": depth_info, "calibration": {k: asdict(v) for k, v in st.calibs.items()},
            "memory_mib": st.memory, "batch_end_s": st.batch_end_s,
            "map": {"voxels": len(self.map), "voxels_per_batch": st.map_sizes, "voxel_size": self.map.voxel_size, "max_voxels": self.map.max_voxels,
                    "evicted": self.map.evicted, "out_of_range_points": self.map.out_of_range},
            "files": {**files, "batches": batches_written},
            "output_folder": self.output_folder.to_dict() if self.output_folder else None,
            "options": {k: str(v) if isinstance(v, Path) else v
                        for k, v in ((f.name, getattr(o, f.name)) for f in fields(o)) if k != "viewer"},
        }
        write_json_atomic(out / "summary.json", summary)
        logger.info("live run: %d batches in %.2f s (%.2f batches/s), map %d voxels -> %s", n, loop_s,
                    summary["batches_per_s"] or 0.0, len(self.map), out)
        return summary


def run_live(opts: LiveOptions, **kwargs: Any) -> dict[str, Any]:
    """Run the live loop (see :class:`LiveSession` for the injectable pieces); returns the summary."""
    return LiveSession(opts, **kwargs).run()
