"""``trt_inference.py``: I/O listing, inputs, inference, benchmarks, comparisons, engine sweeps."""

from __future__ import annotations

import argparse
import logging
import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..accuracy import compare_outputs
from ..atomic import atomic_path, ensure_writable_file, write_json_atomic
from ..errors import InputError, VggtTrtError
from ..pipelines.pcd import pick_views
from ..precisions import TORCH_PRECISIONS
from ..recon.preprocess import load_and_preprocess_images, preprocess_to_shape
from ..recon.rig import discover_scene
from ..model.compiled import ARTIFACT_SUFFIX
from ..runtime.base import Runner, TensorMeta, random_feeds
from ..runtime.benchmark import benchmark
from ..runtime.factory import make_runner
from ..runtime.torch_runner import TorchRunner
from ..runtime.trt_runner import cuda_index
from ..views import ViewRange
from .common import (IMAGE_SIDE, NON_NEGATIVE_INT, POSITIVE_INT, ArgumentParser, add_compile_arguments, given,
                     reject_together, run_cli)

logger = logging.getLogger(__name__)

DESCRIPTION = "Run VGGT through a TensorRT engine, ONNX Runtime or PyTorch: list I/O, infer, benchmark, compare, sweep engines."

_PRECISION_RE = re.compile(r"_(fp32|fp16|bf16|fp8|int8|int4|fp4|nvfp4|best)$")


def runner_from_args(args: argparse.Namespace, which: str | None = None) -> Runner:
    """The runner a set of flags names: ``--engine``, ``--onnx`` or ``--torch`` (first given, or ``which``)."""
    which = which or ("engine" if args.engine else "onnx" if args.onnx else "torch" if args.torch else None)
    if which is None:
        raise InputError("name a model to run: --engine PATH, --onnx PATH or --torch (with --model-name)")
    if which == "engine":
        if not args.engine:
            raise InputError("--compare engine needs --engine PATH")
        if Path(args.engine).suffix == ARTIFACT_SUFFIX:
            return TorchRunner.from_compile_cache(args.engine, device=args.device, weights=args.weights,
                                                  frames_chunk_size=args.frames_chunk_size,
                                                  cuda_graph=args.cuda_graph)
        return make_runner(args.engine, "engine", trt_backend=args.trt_backend,
                           device_index=cuda_index(args.device))
    if which == "onnx":
        if not args.onnx:
            raise InputError("--compare onnx needs --onnx PATH")
        providers = [p.strip() for p in args.ort_providers.split(",")] if args.ort_providers else None
        return make_runner(args.onnx, "onnx", providers=providers, opt_level=args.ort_opt_level)
    return TorchRunner(model_name=args.model_name, weights=args.weights, precision=args.precision,
                       device=args.device, random_init=args.random_init, seed=args.seed, compile=args.compile,
                       compile_cache=args.compile_cache, frames_chunk_size=args.frames_chunk_size,
                       cuda_graph=args.cuda_graph)


def compare_runner(args: argparse.Namespace) -> Runner:
    """``--compare`` value: a backend name (torch, onnx, engine: the model the other flags name) or a file."""
    spec = args.compare
    if spec in ("torch", "onnx", "engine"):
        return runner_from_args(args, spec)
    if Path(spec).is_file():
        kwargs = ({"trt_backend": args.trt_backend, "device_index": cuda_index(args.device)}
                  if spec.endswith((".engine", ".plan")) else {})
        return make_runner(spec, **kwargs)
    raise InputError(f"--compare {spec!r}: expected torch, onnx, engine or an existing .onnx/.engine file")


def list_io(runner: Runner) -> dict[str, Any]:
    """Inputs (name, shape, dtype) and output names of an active runner."""
    return {"runner": runner.info(), "inputs": [m.to_dict() for m in runner.input_metadata()],
            "outputs": runner.output_names()}


def _image_meta(runner: Runner) -> TensorMeta:
    meta = runner.input_metadata()
    if len(meta) != 1 or len(meta[0].shape) != 4:
        raise InputError(f"{runner.name}: expected one [S,3,H,W] image input, found {[m.to_dict() for m in meta]}")
    return meta[0]


def scene_views(images: str, needed: int | None, views: ViewRange | None) -> tuple[list[str], list[Path]]:
    """View names and image files of a scene as ``pcd_inference.py`` picks them: frame 0 of each camera of a
    per-camera folder, or each image of a flat folder or glob."""
    scene = discover_scene(images)
    names, paths, _ = pick_views(scene, needed, views)
    logger.info("%s (%s layout): %d views: %s", scene.root, scene.layout, len(names), ", ".join(names))
    return names, paths


def load_feeds(runner: Runner, images: str | None = None, npy: str | None = None, preprocess: str = "crop",
               num_cams: int | None = None, size: int | None = None, seed: int = 0) -> tuple[dict[str, np.ndarray],
                                                                                               list[str]]:
    """Inputs for ``runner``: images (folder/glob, preprocessed to its input shape), a ``.npy``, or random."""
    meta = _image_meta(runner)
    s_fixed, _, h_fixed, w_fixed = meta.shape
    views = runner.view_range()
    default_size = size or (runner.config.img_size if isinstance(runner, TorchRunner) else 518)
    if npy:
        try:
            arr = np.load(npy)
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read {npy}: {exc}") from exc
        if arr.ndim == 5 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 4 or arr.shape[1] != 3:
            raise InputError(f"{npy}: expected images [S,3,H,W] (or [1,S,3,H,W]), found {list(arr.shape)}")
        return {meta.name: arr.astype(np.float32, copy=False)}, [f"{Path(npy).name}[{i}]" for i in range(arr.shape[0])]
    if images:
        names, paths = scene_views(images, s_fixed or num_cams, views)
        if h_fixed and w_fixed:
            arr = preprocess_to_shape(paths, h_fixed, w_fixed)
        else:
            arr = load_and_preprocess_images(paths, mode=preprocess, target_size=default_size)
        return {meta.name: arr}, names
    shape = (s_fixed or num_cams or (views.opt if views else 2), 3, h_fixed or default_size, w_fixed or default_size)
    logger.info("no --images/--npy: random input of shape %s (seed %d)", list(shape), seed)
    return random_feeds([meta], shape, seed), [f"random[{i}]" for i in range(shape[0])]


def save_outputs(path: str | os.PathLike, outputs: dict[str, np.ndarray]) -> Path:
    target = Path(path)
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **outputs)
    return target


# ----------------------------------------------------------------------------------------- engine sweep
def views_text(runner: Runner) -> str:
    """The runner's views per forward as the I/O listing and the sweep table show them: ``8``, ``2..16``, ``any``
    (``-`` for a model without one [S,3,H,W] input)."""
    meta = runner.input_metadata()
    if len(meta) != 1 or len(meta[0].shape) != 4:
        return "-"
    views = runner.view_range()
    if views is None:
        return "any"
    return str(views.min) if views.min == views.max else f"{views.min}..{views.max}"


def engine_facts(engine: Path, root: Path) -> dict[str, str]:
    """Quant mode (the engine's folder under ``root``) and precision (``_<prec>`` name suffix) of an engine."""
    rel_parent = engine.parent.relative_to(root)
    quant_mode = rel_parent.parts[0] if rel_parent.parts else root.name
    m = _PRECISION_RE.search(engine.stem)
    return {"quant_mode": quant_mode, "precision": m.group(1) if m else "?"}


def engine_files(root: Path) -> list[Path]:
    """The ``*.engine`` files under ``root``, without hidden names or anything in a hidden folder (temporary files,
    a conversion's staging folder, the ``.replaced-*`` folders of files moved aside)."""
    return sorted(p for p in root.rglob("*.engine")
                  if not any(part.startswith(".") for part in p.relative_to(root).parts))


def sweep_engines(root: str | os.PathLike, warmup: int = 3, iters: int = 10, trt_backend: str = "auto",
                  seed: int = 0) -> list[dict[str, Any]]:
    """Benchmark every ``*.engine`` under ``root`` on random input; an engine that cannot run says why."""
    root_p = Path(root)
    if not root_p.is_dir():
        raise InputError(f"--engines-dir: not a folder: {root_p}")
    engines = engine_files(root_p)
    if not engines:
        raise InputError(f"no .engine files under {root_p}")
    rows = []
    for path in engines:
        row: dict[str, Any] = {"engine": str(path), **engine_facts(path, root_p)}
        try:
            with make_runner(path, "engine", trt_backend=trt_backend) as runner:
                row["views"] = views_text(runner)
                feeds = random_feeds(runner.input_metadata(), seed=seed)
                res = benchmark(runner, feeds, warmup, iters)
            timed_shape = next(iter(res.input_shapes.values()))
            row.update(status="ok", benchmark_views=timed_shape[0] if timed_shape else None, fps=res.fps,
                       latency_ms=res.latency_ms["median"], p90_ms=res.latency_ms["p90"], peak_device_memory_mb=res.peak_device_memory_mb)
        except VggtTrtError as exc:
            row.update(status="cannot run", reason=str(exc))
            logger.warning("%s: cannot run here: %s", path.name, exc)
        rows.append(row)
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["fps"])
    for rank, r in enumerate(ok, 1):
        r["rank"] = rank
    return ok + [r for r in rows if r["status"] != "ok"]


def format_sweep(rows: Sequence[dict[str, Any]]) -> str:
    """The ranked summary table: rank, FPS, latency, views (the engine's range; a dynamic engine is timed at its
    optimum), quant mode, precision, engine (reason when it cannot run)."""
    head = f"{'rank':>4}  {'FPS':>8}  {'latency ms':>10}  {'views':<10} {'quant mode':<20} {'precision':<9} engine"
    lines = [head, "-" * len(head)]
    for r in rows:
        views = r.get("views", "?")
        if r["status"] == "ok":
            if views != str(r.get("benchmark_views", views)):
                views = f"{views}@{r['benchmark_views']}"
            lines.append(f"{r['rank']:>4}  {r['fps']:>8.2f}  {r['latency_ms']:>10.2f}  {views:<10} "
                         f"{r['quant_mode']:<20} {r['precision']:<9} {r['engine']}")
        else:
            lines.append(f"{'-':>4}  {'-':>8}  {'-':>10}  {views:<10} {r['quant_mode']:<20} {r['precision']:<9} "
                         f"{r['engine']}\n{'':>6}cannot run here: {r['reason']}")
    return "\n".join(lines)


def format_compare(result: dict[str, Any], ref_name: str, test_name: str) -> str:
    lines = [f"{test_name} vs reference {ref_name}",
             f"{'output':<18} {'shape':<24} {'rel L2':>10} {'max abs':>10} {'|ref| max':>10}"]
    for name, e in result["outputs"].items():
        lines.append(f"{name:<18} {str(e['shape']):<24} {e['rel_l2']:>10.3g} {e['max_abs']:>10.3g} "
                     f"{e['ref_max_abs']:>10.3g}")
    if "pose" in result:
        p = result["pose"]
        lines.append(f"pose: rotation error mean {p['rotation_error_deg']['mean']:.4g} deg (max "
                     f"{p['rotation_error_deg']['max']:.4g}), translation error mean "
                     f"{p['translation_error']['mean']:.4g} (relative {p['translation_error']['relative_mean']:.3g})")
    if "depth" in result:
        d = result["depth"]
        lines.append(f"depth: AbsRel {d['abs_rel']:.4g}, RMSE {d['rmse']:.4g}, delta<1.25 {d['delta_1.25']:.4f}")
    return "\n".join(lines)


def format_benchmark(res: dict[str, Any]) -> str:
    lat = res["latency_ms"]
    mem = res["peak_device_memory_mb"]
    return (f"{res['runner']['name']} ({res['runner']['device']}, {res['timing_method']}): median {lat['median']:.2f} ms,"
            f" p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms, {res['fps']:.2f} FPS"
            + (f", {res['views_per_s']:.1f} views/s" if res.get("views_per_s") else "")
            + (f", peak device memory {mem:.0f} MiB" if mem is not None else ""))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="trt_inference.py", description=DESCRIPTION)
    model = p.add_argument_group("model (one of)")
    model.add_argument("--engine", help="serialised TensorRT / TensorRT-RTX engine (.engine), or a compiled "
                                        "PyTorch engine (.torchcache from vggt_to_trt.py --backend torch)")
    model.add_argument("--onnx", help="ONNX graph, run with ONNX Runtime")
    model.add_argument("--torch", action="store_true", help="our PyTorch VGGT (see --model-name)")
    model.add_argument("--engines-dir", help="benchmark every .engine under this folder and rank them")
    tm = p.add_argument_group("PyTorch model")
    tm.add_argument("--model-name", default="facebook/VGGT-1B", help="preset (tiny, vggt-1b), hub id or local dir")
    tm.add_argument("--weights", help="local checkpoint (model.safetensors / model.pt)")
    tm.add_argument("--random-init", action="store_true", help="seeded random weights, no download")
    tm.add_argument("--precision", default="fp32",
                    choices=TORCH_PRECISIONS)
    tm.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1")
    add_compile_arguments(tm)
    rt = p.add_argument_group("runtimes")
    rt.add_argument("--trt-backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"))
    rt.add_argument("--ort-providers", help="comma list: cpu, cuda, tensorrt (default: cuda if available, else cpu)")
    rt.add_argument("--ort-opt-level", default="basic", choices=("disable", "basic", "extended", "all"))
    data = p.add_argument_group("input (default: random)")
    data.add_argument("--images", help="scene as pcd_inference.py reads it: a folder with one sub-folder per camera "
                                       "(frame 0 of each) or a flat folder/glob (one view per image), preprocessed "
                                       "to the model's input shape")
    data.add_argument("--npy", help=".npy with images [S,3,H,W] in [0,1]")
    data.add_argument("--preprocess", default="crop", choices=("crop", "pad"), help="for dynamic-shape models")
    data.add_argument("--num-cams", type=POSITIVE_INT, help="views for dynamic-shape models (random input default: 2)")
    data.add_argument("--size", type=IMAGE_SIDE, help="square size for dynamic-shape models (default: the preset's)")
    data.add_argument("--seed", type=NON_NEGATIVE_INT, default=0)
    act = p.add_argument_group("actions")
    act.add_argument("--list-io", action="store_true", help="only list inputs and outputs")
    act.add_argument("--benchmark", action="store_true", help="time warm-up + iterations")
    act.add_argument("--warmup", type=NON_NEGATIVE_INT, default=3, help="untimed runs before --benchmark")
    act.add_argument("--iters", type=POSITIVE_INT, default=10, help="timed runs of --benchmark")
    act.add_argument("--compare", help="reference backend: torch, onnx, engine (the one named by the other flag) "
                                       "or a .onnx/.engine path")
    act.add_argument("--save-outputs", help="write the outputs to this .npz")
    act.add_argument("--json", help="write every result as JSON to this file")
    p.add_argument("--log-dir", type=Path, default=None, help="also log to a file here")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def run(args: argparse.Namespace) -> int:
    report: dict = {}
    for flag, path in (("--json", args.json), ("--save-outputs", args.save_outputs)):
        if path:
            ensure_writable_file(path, flag)
    if args.engines_dir:
        rows = sweep_engines(args.engines_dir, args.warmup, args.iters, args.trt_backend, args.seed)
        print(format_sweep(rows))
        report["sweep"] = rows
    else:
        with runner_from_args(args) as runner:
            io = list_io(runner)
            report["io"] = io
            print(f"{runner.name} ({runner.device})")
            for m in io["inputs"]:
                span = f"  min {m['min_shape']} opt {m['opt_shape']} max {m['max_shape']}" if "min_shape" in m else ""
                print(f"  input  {m['name']:<18} {str(m['shape']):<24} {m['dtype']}{span}")
            io["views"] = views_text(runner)
            print(f"  views  {io['views']}")
            for name in io["outputs"]:
                print(f"  output {name}")
            if not args.list_io:
                feeds, names = load_feeds(runner, args.images, args.npy, args.preprocess, args.num_cams,
                                             args.size, args.seed)
                outputs = runner.infer(feeds)
                report["inference"] = {"views": names, "ms": runner.last_inference_ms,
                                       "outputs": {k: list(v.shape) for k, v in outputs.items()}}
                print(f"inference on {len(names)} views: {runner.last_inference_ms:.2f} ms")
                for k, v in outputs.items():
                    print(f"  {k:<18} {str(list(v.shape)):<24} min {v.min():.4g} max {v.max():.4g}")
                if args.save_outputs:
                    print(f"outputs written to {save_outputs(args.save_outputs, outputs)}")
                if args.benchmark:
                    res = benchmark(runner, feeds, args.warmup, args.iters).to_dict()
                    report["benchmark"] = res
                    print(format_benchmark(res))
                if args.compare:
                    with compare_runner(args) as ref_runner:
                        ref = ref_runner.infer(feeds)
                        image_hw = feeds[next(iter(feeds))].shape[-2:]
                        result = compare_outputs(ref, outputs, image_hw)
                        result.update(reference=ref_runner.info(), test=runner.info())
                        report["compare"] = result
                        print(format_compare(result, ref_runner.name, runner.name))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"results written to {args.json}")
    return 0


LIST_ONLY = "--list-io only lists inputs and outputs"
CONTRADICTIONS = (
    ("--images", "--npy", "give one input"),
    ("--list-io", "--benchmark", LIST_ONLY), ("--list-io", "--compare", LIST_ONLY),
    ("--list-io", "--save-outputs", LIST_ONLY),
    *(("--engines-dir", flag, "--engines-dir benchmarks every engine under a folder, on random input")
      for flag in ("--engine", "--onnx", "--torch", "--compare", "--images", "--npy", "--save-outputs")),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The flags, with contradictory combinations refused (one line, exit 2) before any model is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    reject_together(args, parser, *CONTRADICTIONS)
    models = [flag for flag in ("--engine", "--onnx", "--torch") if given(args, flag)]
    if len(models) > 1 and not args.compare:
        parser.error(f"{' and '.join(models)}: give one model to run (a second one only with --compare)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), args.log_dir, "trt_inference", args.verbose)

