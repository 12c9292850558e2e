#!/usr/bin/env python3
"""Images-to-PLY throughput of the point-cloud pipeline with the PyTorch backend, split by stage.

Runs ``vggt_trt.pipelines.pcd.run_pcd`` repeatedly with one loaded model and reports the median time of each stage
(select, preprocess, inference, decode, unproject, colour, filter, voxel, write) and of the whole run.
Needs only torch, numpy, pillow and plyfile (plus this repository on PYTHONPATH):

    PYTHONPATH=. python benchmarks/bench_pcd_pipeline.py --model-name vggt-1b --random-init \\
        --num-cams 8 --size 518 --device cuda --precision bf16 --json bench_pcd.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_images(folder: Path, num: int, width: int, height: int, seed: int = 0) -> Path:
    """Textured synthetic views (smooth gradients + noise) written as JPEG, one per camera."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for i in range(num):
        base = np.stack([np.sin(xx / (17 + i)) , np.cos(yy / (23 + 2 * i)), np.sin((xx + yy) / 31)], -1)
        img = (127 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"cam{i:03d}.jpg", quality=95)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-name", default="tiny", help="preset: tiny (CPU smoke test) or vggt-1b")
    p.add_argument("--weights", help="checkpoint; default: seeded random weights (timing does not depend on them)")
    p.add_argument("--random-init", action="store_true")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-cams", type=int, default=8)
    p.add_argument("--size", type=int, help="model input size (square images; default: the preset's)")
    p.add_argument("--images", help="scene folder (default: synthetic square images)")
    p.add_argument("--conf-percentile", type=float, default=50.0)
    p.add_argument("--voxel-size", type=float)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from vggt_trt.model.config import get_preset
    from vggt_trt.pipelines.pcd import PcdOptions, run_pcd
    from vggt_trt.runtime.torch_runner import TorchRunner

    size = args.size or get_preset(args.model_name).img_size
    runner = TorchRunner(model_name=args.model_name, weights=args.weights, precision=args.precision,
                         device=args.device, random_init=args.random_init or args.weights is None)
    t0 = time.perf_counter()
    runner.activate()
    load_s = time.perf_counter() - t0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        scene = Path(args.images) if args.images else Path(tmp) / "scene"
        if not args.images:
            scene.mkdir()
            make_images(scene, args.num_cams, size, size)
        opts = PcdOptions(images=scene, out_dir=Path(tmp) / "out", num_cams=args.num_cams, target_size=size,
                          conf_percentile=args.conf_percentile or None, voxel_size=args.voxel_size,
                          save_images=False)
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            summary = run_pcd(opts, runner=runner)
            total = (time.perf_counter() - t0) * 1e3
            if i >= args.warmup:
                runs.append({"total_ms": total, **summary["timings_ms"]})
    runner.deactivate()
    stages = [k for k in runs[0] if k not in ("load_model",)]
    median = {k: statistics.median(r[k] for r in runs) for k in stages}
    post = sum(median.get(k, 0.0) for k in ("decode", "unproject", "colour", "filter"))
    result = {
        "what": "images-to-PLY, PyTorch backend, median of iterations",
        "model": args.model_name, "precision": args.precision, "device": runner.device,
        "gpu": torch.cuda.get_device_name() if runner.device.startswith("cuda") else None,
        "input_shape": summary["input_shape"], "points": summary["points"],
        "postprocess_device": summary["postprocess_device"], "model_load_s": round(load_s, 2),
        "warmup": args.warmup, "iters": args.iters, "median_ms": {k: round(v, 3) for k, v in median.items()},
        "postprocess_ms (decode+unproject+colour+filter)": round(post, 3),
        "images_to_ply_per_s": round(1e3 / median["total_ms"], 3),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "cuda": torch.version.cuda, "numpy": np.__version__},
        "runs": runs,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
