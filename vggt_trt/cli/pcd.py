"""Multi-view images -> VGGT (TensorRT engine, ONNX Runtime or PyTorch) -> point cloud, cameras, COLMAP model."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from ..errors import InputError
from ..pipelines.live import LiveOptions, run_live
from ..pipelines.pcd import PcdOptions, run_pcd
from ..pipelines.scenes import find_scenes, run_scenes
from ..precisions import TORCH_PRECISIONS
from ..view.live import LiveViewer
from ..view.server import require_viser, serve_until_interrupted
from .common import (FRACTION, IMAGE_SIDE, NON_NEGATIVE_FLOAT, NON_NEGATIVE_INT, PERCENTILE, POSITIVE_FLOAT,
                     POSITIVE_INT, ArgumentParser, add_compile_arguments, add_ray_arguments, given, ray_kwargs,
                     reject_together, run_cli)
from .view import add_viewer_address


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="pcd_inference.py", description=__doc__)
    src = p.add_argument_group("input")
    src.add_argument("--source", default="images", choices=("images", "videos", "webcams"),
                     help="images: a scene folder; videos / webcams: the live pipeline (vggt_trt.pipelines.live)")
    src.add_argument("--images", type=Path,
                     help="scene root: one sub-folder of frames per camera (cam001/, cam005/ ...) or a flat "
                          "folder of images (one view each)")
    src.add_argument("--scenes", metavar="GLOB",
                     help="many scene folders, e.g. 'captures/*': each reconstructed into --out-dir/<scene name>/, "
                          "a summary in --out-dir/scenes.json; one worker per GPU (or --workers), or Ray with "
                          "RAY_ADDRESS (--out-dir must then be on storage every node sees)")
    src.add_argument("--workers", type=POSITIVE_INT,
                     help="--scenes: workers, each keeping its model loaded (default: one per GPU, else 1)")
    src.add_argument("--views", help="comma-separated cameras, e.g. cam001,cam005,cam012")
    src.add_argument("--random-views", type=POSITIVE_INT, help="pick this many cameras at random (--seed)")
    src.add_argument("--num-cams", type=POSITIVE_INT,
                     help="views per forward (default: the engine's, else 8 or all given)")
    src.add_argument("--frame", type=NON_NEGATIVE_INT, default=0,
                     help="frame index within each camera folder (default 0)")
    src.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    model = p.add_argument_group("model (one of)")
    model.add_argument("--vggt-engine", type=Path, help="TensorRT / TensorRT-RTX engine, or a compiled PyTorch "
                                                        "engine (.torchcache from vggt_to_trt.py --backend torch)")
    model.add_argument("--onnx", type=Path, help="ONNX graph, run with ONNX Runtime")
    model.add_argument("--torch", action="store_true", help="our PyTorch VGGT (default when no file is given)")
    model.add_argument("--model-name", default="facebook/VGGT-1B", help="preset (tiny, vggt-1b), hub id or dir")
    model.add_argument("--weights", type=Path, help="local checkpoint for --torch")
    model.add_argument("--random-init", action="store_true", help="seeded random weights for --torch")
    model.add_argument("--precision", default="fp32",
                       choices=TORCH_PRECISIONS)
    model.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    add_compile_arguments(model)
    model.add_argument("--trt-backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"))
    cams = p.add_argument_group("known cameras")
    cams.add_argument("--intrinsics", type=Path, help="known intrinsics (.json/.yaml/.npz), source pixels")
    cams.add_argument("--poses", type=Path, help="known poses (.json/.yaml/.npz): align the cloud to the rig frame")
    cams.add_argument("--poses-convention", choices=("c2w", "w2c"), help="default: the file's, else c2w")
    proc = p.add_argument_group("processing")
    proc.add_argument("--preprocess", default="crop", choices=("crop", "pad"))
    proc.add_argument("--target-size", type=IMAGE_SIDE, help="official crop/pad size for --torch (default: preset's)")
    proc.add_argument("--conf-threshold", type=NON_NEGATIVE_FLOAT, help="keep points with confidence >= this")
    proc.add_argument("--conf-percentile", type=PERCENTILE, default=50.0,
                      help="drop the lowest X %% by confidence (default 50, as the official demo; 0 keeps all)")
    proc.add_argument("--mask-black-bg", action="store_true", help="drop near-black pixels")
    proc.add_argument("--mask-white-bg", action="store_true", help="drop near-white pixels")
    proc.add_argument("--voxel-size", type=POSITIVE_FLOAT, help="voxel downsampling size (cloud units)")
    proc.add_argument("--colmap-max-points", type=NON_NEGATIVE_INT, default=200_000,
                      help="points written to COLMAP points3D.txt (uniform sample; 0 = all; the PLY has all)")
    out = p.add_argument_group("output")
    out.add_argument("--out-dir", type=Path, required=True)
    out.add_argument("--save-images", action=argparse.BooleanOptionalAction, default=True,
                     help="write the preprocessed views to out_dir/images (what the COLMAP model describes)")
    out.add_argument("--log-dir", type=Path, default=None, help="also log to a file here")
    view = p.add_argument_group("viewer (pip install -r requirements-view.txt)")
    view.add_argument("--viewer", action="store_true",
                      help="--source images: serve the result in the browser after the run, until Ctrl-C; "
                           "videos/webcams: the growing map, updated every batch while the loop runs")
    add_viewer_address(view, "viewer-")
    add_ray_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    add_live_arguments(p)
    return p


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    """The live flags of ``pcd_inference.py`` (videos/webcams); shared flags live in the front end."""
    g = parser.add_argument_group("live sources (--source videos | webcams)")
    g.add_argument("--videos", type=Path, help="one video per camera: camXX.mp4 files or per-camera sub-folders")
    g.add_argument("--webcams", nargs="+", help="device indices or name=index: 0 1 2 or front=0 back=1")
    g.add_argument("--frame-step", type=POSITIVE_INT, default=1, help="use every N-th frame of each camera")
    g.add_argument("--max-batches", type=POSITIVE_INT, help="stop after this many lock-step batches")
    g.add_argument("--min-cams", type=POSITIVE_INT, help="go on while this many cameras deliver (default: all)")
    g.add_argument("--stall-timeout", type=POSITIVE_FLOAT, default=5.0, help="seconds to wait for a camera's frame")
    g.add_argument("--vggt-every", type=NON_NEGATIVE_INT, default=0,
                   help="re-run VGGT every N batches to refresh the fit")
    d = parser.add_argument_group("Depth Anything")
    d.add_argument("--depth-model", default="depth-anything/Depth-Anything-V2-Small-hf",
                   help="hub id (local cache), snapshot dir, or preset tiny / vits (random weights)")
    d.add_argument("--depth-engine-dir", type=Path, help="folder of Depth Anything engines / ONNX graphs")
    d.add_argument("--depth-backend", default="auto", choices=("auto", "engine", "onnx", "torch"))
    d.add_argument("--depth-workers", type=POSITIVE_INT, default=1,
                   help="Depth Anything runners sharing each batch (default 1: one batched forward, what a GPU "
                        "wants); more help with several TensorRT contexts/GPUs or per-image engines")
    d.add_argument("--depth-compile", action="store_true",
                   help="torch.compile Depth Anything (PyTorch backend; about 20 s once, then faster batches)")
    d.add_argument("--depth-precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    d.add_argument("--depth-random-init", action="store_true", help="seeded random Depth Anything weights")
    d.add_argument("--depth-allow-download", action="store_true", help="let transformers download weights")
    m = parser.add_argument_group("calibration and map")
    m.add_argument("--per-camera-calib", type=Path, help="scale/shift + cameras JSON, reused across runs "
                                                         "(default: out_dir/per_camera_calib.json)")
    m.add_argument("--initial-map", type=Path, help="PLY to seed the map with (map frame)")
    m.add_argument("--ema", type=FRACTION, default=0.3, help="weight of a new scale/shift fit (0..1]")
    m.add_argument("--max-voxels", type=POSITIVE_INT, default=2_000_000, help="map size bound (oldest voxels evicted)")
    m.add_argument("--pixel-stride", type=POSITIVE_INT, default=1, help="unproject every N-th pixel")
    m.add_argument("--save-batches", action=argparse.BooleanOptionalAction, default=True,
                   help="PLY per batch in out_dir/batches (default: on)")


def options_from_args(args: argparse.Namespace) -> LiveOptions:
    """The live pipeline's options from the parsed flags."""
    backend = "engine" if args.vggt_engine else "onnx" if args.onnx else "torch"
    return LiveOptions(
        source=args.source, out_dir=args.out_dir, images=args.images, videos=args.videos, webcams=args.webcams,
        num_cams=args.num_cams, random_views=args.random_views, seed=args.seed,
        views=[v.strip() for v in args.views.split(",") if v.strip()] if args.views else None,
        frame_step=args.frame_step, max_batches=args.max_batches, min_cams=args.min_cams,
        stall_timeout=args.stall_timeout, backend=backend, model_path=args.vggt_engine or args.onnx,
        model_name=args.model_name, weights=args.weights, precision=args.precision, device=args.device,
        random_init=args.random_init, trt_backend=args.trt_backend, target_size=args.target_size,
        compile=args.compile, compile_cache=args.compile_cache, frames_chunk_size=args.frames_chunk_size,
        cuda_graph=args.cuda_graph, vggt_every=args.vggt_every, depth_model=args.depth_model,
        depth_engine_dir=args.depth_engine_dir,
        depth_backend=args.depth_backend, depth_workers=args.depth_workers, depth_precision=args.depth_precision,
        depth_random_init=args.depth_random_init, depth_allow_download=args.depth_allow_download,
        intrinsics=args.intrinsics, poses=args.poses, poses_convention=args.poses_convention,
        per_camera_calib=args.per_camera_calib, initial_map=args.initial_map,
        conf_percentile=args.conf_percentile or 0.0, ema=args.ema, voxel_size=args.voxel_size,
        max_voxels=args.max_voxels, pixel_stride=args.pixel_stride, save_batches=args.save_batches,
        depth_compile=args.depth_compile)


def run(args: argparse.Namespace) -> int:
    if args.scenes and args.source != "images":
        raise InputError("--scenes reconstructs folders of images (--source images), not videos or webcams")
    if args.viewer:
        require_viser()
    if args.source != "images":
        opts = options_from_args(args)
        with contextlib.ExitStack() as stack:
            if args.viewer:
                opts.viewer = stack.enter_context(LiveViewer(args.viewer_host, args.viewer_port))
                print(f"viewer: http://{args.viewer_host}:{opts.viewer.port}", flush=True)
            s = run_live(opts)
        print(f"{s['batches']} batches from {len(s['source']['cameras'])} cameras -> map of {s['map']['voxels']} "
              f"voxels in {args.out_dir} ({s['batches_per_s'] or 0:.2f} batches/s)")
        for e in s["source"]["events"]:
            print(f"camera {e['camera']} {e['event']} at batch {e['batch']}: {e['reason']}")
        return 0
    if args.scenes:
        return run_batch(args)
    if args.images is None:
        raise InputError("--source images needs --images (or --scenes)")
    opts = pcd_options(args, args.images, args.out_dir)
    summary = run_pcd(opts)
    pts, t = summary["points"], summary["timings_ms"]
    print(f"{len(summary['scene']['views'])} views ({', '.join(summary['scene']['views'])}) -> "
          f"{pts['written']} points (of {pts['total']}) in {args.out_dir}")
    if summary["scene"]["skipped"]:
        print("skipped: " + "; ".join(f"{s['view']}: {s['reason']}" for s in summary["scene"]["skipped"]))
    if summary["alignment"]:
        print(f"aligned to known poses: scale {summary['alignment']['scale']:.4g}, "
              f"residual RMS {summary['alignment']['residual_rms']:.4g}")
    print("timings (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()))
    if args.viewer:
        serve_until_interrupted(args.out_dir, args.viewer_host, args.viewer_port, on_ready=lambda view: print(
            f"viewer: http://{args.viewer_host}:{view.server.get_port()} (Ctrl-C stops it)", flush=True))
    return 0


def pcd_options(args: argparse.Namespace, images: Path, out_dir: Path) -> PcdOptions:
    """The images pipeline's options from the parsed flags, for one scene folder."""
    backend = "engine" if args.vggt_engine else "onnx" if args.onnx else "torch"
    return PcdOptions(
        images=images, out_dir=out_dir, backend=backend, model_path=args.vggt_engine or args.onnx,
        model_name=args.model_name, weights=args.weights, precision=args.precision, device=args.device,
        random_init=args.random_init, trt_backend=args.trt_backend, compile=args.compile,
        compile_cache=args.compile_cache, frames_chunk_size=args.frames_chunk_size, cuda_graph=args.cuda_graph,
        views=[v.strip() for v in args.views.split(",") if v.strip()] if args.views else None,
        random_views=args.random_views, num_cams=args.num_cams, frame=args.frame, seed=args.seed,
        intrinsics=args.intrinsics, poses=args.poses, poses_convention=args.poses_convention,
        preprocess=args.preprocess, target_size=args.target_size, conf_threshold=args.conf_threshold,
        conf_percentile=args.conf_percentile or None, mask_black_bg=args.mask_black_bg,
        mask_white_bg=args.mask_white_bg, voxel_size=args.voxel_size, save_images=args.save_images,
        colmap_max_points=args.colmap_max_points)


def run_batch(args: argparse.Namespace) -> int:
    """``--scenes``: every matching folder into --out-dir/<name>; exit 1 when any scene failed (the flags were
    checked by :func:`parse_args`)."""
    scenes = find_scenes(args.scenes)
    summary = run_scenes(pcd_options(args, scenes[0], args.out_dir), scenes, args.out_dir, workers=args.workers,
                         ray_address=args.ray_address, ray_kwargs=ray_kwargs(args))
    for r in summary["results"]:
        detail = f"{r.get('points')} points" if r["status"] == "ok" else r.get("error", "")
        print(f"{r['scene']:<24} {r['status']:<7} {r.get('seconds', 0):7.1f} s  {detail}")
    rate = summary["scenes_per_s"]
    print(f"{summary['ok']} of {summary['scenes']} scenes in {summary['wall_s']:.1f} s "
          f"({summary['workers']}{f', {rate:.3g} scenes/s' if rate else ''}); summary: {args.out_dir}/scenes.json")
    return 0 if summary["failed"] == 0 else 1


CONTRADICTIONS = (
    ("--views", "--random-views", "--views names the cameras, --random-views picks them at random"),
    ("--images", "--scenes", "give --images (one scene) or --scenes (many)"),
    ("--scenes", "--viewer", "--viewer serves one result; open a scene's folder with vggt-view after a --scenes run"),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with contradictory combinations refused (one line, exit 2) before any model is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    reject_together(args, parser, *CONTRADICTIONS)
    models = [flag for flag in ("--vggt-engine", "--onnx", "--torch") if given(args, flag)]
    if len(models) > 1:
        parser.error(f"{' and '.join(models)}: give one model")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), args.log_dir, "pcd_inference", args.verbose)

