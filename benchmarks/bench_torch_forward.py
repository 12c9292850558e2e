"""Time our PyTorch VGGT forward on a GPU: latency (median of N), peak memory, bf16 error vs fp32.

Usage: python benchmarks/bench_torch_forward.py --preset vggt-1b --num-cams 8 --size 518 --json OUT.json
Weights are seeded random (no download). Timing uses CUDA events after warm-up iterations.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from vggt_trt.accuracy import tensor_errors
from vggt_trt.model.precision import apply_precision
from vggt_trt.model.vggt import FULL_OUTPUTS, PCD_OUTPUTS
from vggt_trt.model.weights import build_model


def time_forward(model, images, outputs, context, warmup: int, iters: int) -> dict:
    with torch.no_grad():
        for _ in range(warmup):
            with context():
                model(images, outputs=outputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            with context():
                out = model(images, outputs=outputs)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return {
        "median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "p90_ms": float(np.percentile(times, 90)),
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
        "outputs": {k: v.float().cpu().numpy() for k, v in out.items()},
    }


def profile_top_kernels(model, images, outputs, context, top: int = 25) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        with context():
            model(images, outputs=outputs)
        torch.cuda.synchronize()
    rows = [e for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda e: e.device_time_total, reverse=True)
    return [{"name": e.key[:120], "calls": e.count, "cuda_ms": e.device_time_total / 1000} for e in rows[:top]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="vggt-1b")
    p.add_argument("--num-cams", type=int, default=8)
    p.add_argument("--size", type=int, nargs=2, default=(518, 518), metavar=("H", "W"))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--modes", nargs="+", default=[
        "pcd:bf16-autocast", "pcd:bf16", "pcd:bf16+compile", "full:bf16-autocast", "pcd:fp32", "full:fp32"])
    p.add_argument("--json", type=Path)
    p.add_argument("--profile", help="mode to profile with torch.profiler (top CUDA kernels written beside --json)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    t0 = time.perf_counter()
    base = build_model(args.preset, random_init=True, seed=0)
    build_s = time.perf_counter() - t0
    images = torch.rand(args.num_cams, 3, *args.size, generator=torch.Generator().manual_seed(1)).cuda()
    results = {"machine": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "preset": args.preset,
               "shape": [args.num_cams, 3, *args.size], "iters": args.iters, "model_build_s": build_s, "modes": {}}
    references = {}
    for mode in sorted(args.modes, key=lambda m: "fp32" not in m):  # fp32 first: the error reference
        which, prec = mode.split(":")
        compile_ = prec.endswith("+compile")
        prec = prec.removesuffix("+compile")
        outputs = PCD_OUTPUTS if which == "pcd" else FULL_OUTPUTS
        model = copy.deepcopy(base).cuda().eval()
        context = apply_precision(model, prec)
        runner = model
        if compile_:
            runner = torch.compile(model, dynamic=False)
        t1 = time.perf_counter()
        r = time_forward(runner, images, outputs, context, args.warmup, args.iters)
        r["wall_incl_warmup_s"] = time.perf_counter() - t1
        outs = r.pop("outputs")
        if prec == "fp32":
            references[which] = outs
        if which in references and prec != "fp32":
            r["error_vs_fp32"] = {k: tensor_errors(references[which][k], outs[k]) for k in outs}
        results["modes"][mode] = r
        if args.profile == mode:
            results["profile"] = profile_top_kernels(runner, images, outputs, context)
        print(f"{mode:24s} median {r['median_ms']:8.1f} ms  p90 {r['p90_ms']:8.1f} ms  peak {r['peak_mem_gib']:.2f} GiB", flush=True)
        del model, runner
        torch.cuda.empty_cache()
    text = json.dumps(results, indent=2)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
