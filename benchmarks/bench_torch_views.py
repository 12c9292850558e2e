#!/usr/bin/env python3
"""The PyTorch engine at any number of views: latency (median) and peak GPU memory for each S, eager or compiled.

    PYTHONPATH=. python benchmarks/bench_torch_views.py --views 1 4 8 16 32 64 --json views.json
    PYTHONPATH=. python benchmarks/bench_torch_views.py --views 8 --compile --json views_compiled.json

Seeded random weights of the 1B preset, 518 x 518, pcd-only outputs, frames_chunk_size 8 (the default).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from vggt_trt.model.compiled import compile_regions
from vggt_trt.model.precision import apply_precision
from vggt_trt.model.vggt import PCD_OUTPUTS
from vggt_trt.model.weights import build_model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vggt-1b")
    p.add_argument("--views", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    p.add_argument("--size", type=int, nargs=2, default=(518, 518), metavar=("H", "W"))
    p.add_argument("--precision", default="bf16")
    p.add_argument("--frames-chunk-size", type=int, default=8)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    t0 = time.perf_counter()
    model = build_model(args.preset, random_init=True, seed=0, device="cuda").eval()
    model.frames_chunk_size = args.frames_chunk_size
    context = apply_precision(model, args.precision)
    torch.cuda.synchronize()
    result = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
              "preset": args.preset, "precision": args.precision, "compile": args.compile,
              "frames_chunk_size": args.frames_chunk_size, "model_build_s": round(time.perf_counter() - t0, 2),
              "views": {}}
    if args.compile:
        compile_regions(model)
    for s in args.views:
        images = torch.rand(s, 3, *args.size, device="cuda", generator=torch.Generator("cuda").manual_seed(s))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row: dict = {}
        try:
            with torch.inference_mode(), context():
                t1 = time.perf_counter()
                model(images, outputs=PCD_OUTPUTS)
                torch.cuda.synchronize()
                row["first_call_s"] = round(time.perf_counter() - t1, 3)
                times = []
                for _ in range(args.iters):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    model(images, outputs=PCD_OUTPUTS)
                    end.record()
                    end.synchronize()
                    times.append(start.elapsed_time(end))
            row.update(median_ms=float(np.median(times)), min_ms=float(np.min(times)),
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30)
        except torch.OutOfMemoryError as e:
            row["error"] = f"out of memory: {str(e)[:200]}"
        result["views"][str(s)] = row
        print(f"S={s:3d} {row}", flush=True)
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
