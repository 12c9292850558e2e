#!/usr/bin/env python3
"""Batch reconstruction throughput (``pcd_inference.py --scenes``) on 1 GPU against several GPUs (issue 14).

Writes N synthetic scenes of V views (square JPEGs, one folder each), then runs
``vggt_trt.pipelines.scenes.run_scenes`` once per GPU count: one worker process per GPU keeps its model loaded
and takes scenes from the queue (or Ray actors with RAY_ADDRESS set). Reports, per run, scenes/s over the
steady window (each worker's first scene excluded: it pays for compilation), scenes/s over everything after
start-up, wall time, mean GPU utilisation per GPU (nvidia-smi sampled every 0.5 s, else
torch.cuda.utilization), and the speed-up against the first GPU count.

    PYTHONPATH=. python benchmarks/bench_scenes.py --model-name vggt-1b --precision bf16 --gpus 1 2 \\
        --json docs/benchmarks/scenes_h200x2_bf16.json [--compile --compile-cache /tmp/vggt.torchcache]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pcd_pipeline import make_images  # noqa: E402


class UtilisationSampler:
    """Samples utilisation.gpu of every GPU in a background thread until stopped."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s, self.samples, self.source = interval_s, {}, "none"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _read(self) -> dict[str, float]:
        if shutil.which("nvidia-smi"):
            self.source = "nvidia-smi"
            out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return {line.split(",")[0].strip(): float(line.split(",")[1]) for line in out.splitlines() if "," in line}
        import torch

        self.source = "torch.cuda.utilization"
        return {str(i): float(torch.cuda.utilization(i)) for i in range(torch.cuda.device_count())}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            for gpu, value in self._read().items():
                self.samples.setdefault(gpu, []).append((time.time(), value))

    def __enter__(self) -> "UtilisationSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> dict[str, float]:
        """Mean utilisation (%) of each GPU between two wall-clock times."""
        out = {}
        for gpu, values in self.samples.items():
            window = [v for t, v in values if start <= t <= end]
            if window:
                out[gpu] = round(sum(window) / len(window), 1)
        return out


def steady_rate(results: list[dict[str, Any]]) -> tuple[float | None, float, float]:
    """Scenes/s without each worker's first scene, and that window's start and end (wall-clock)."""
    ok = sorted((r for r in results if r["status"] == "ok"), key=lambda r: r["start"])
    seen, steady = set(), []
    for r in ok:
        worker = (r["worker"]["host"], r["worker"]["pid"])
        if worker in seen:
            steady.append(r)
        seen.add(worker)
    if not steady:
        return None, 0.0, 0.0
    start, end = min(r["start"] for r in steady), max(r["end"] for r in steady)
    return (round(len(steady) / (end - start), 4) if end > start else None), start, end


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-name", default="vggt-1b", help="preset (vggt-1b; tiny for a CPU smoke test)")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--device", default="cuda", help="cuda (one GPU per worker) or cpu (smoke test)")
    p.add_argument("--scenes", type=int, default=16)
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--size", type=int, default=518)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="worker counts to compare (default 1 2)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile in every worker")
    p.add_argument("--compile-cache", type=Path, help=".torchcache shared by the workers (written on first use)")
    p.add_argument("--work-dir", type=Path, help="where scenes and outputs go (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from vggt_trt.pipelines.pcd import PcdOptions
    from vggt_trt.pipelines.scenes import find_scenes, run_scenes

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench_scenes_"))
    for i in range(args.scenes):
        folder = work / "captures" / f"scene{i:03d}"
        if not folder.is_dir():
            folder.mkdir(parents=True)
            make_images(folder, args.views, args.size, args.size, seed=i)
    scenes = find_scenes(str(work / "captures" / "*"))
    template = PcdOptions(images=scenes[0], out_dir=work, model_name=args.model_name, random_init=True,
                          precision=args.precision, device=args.device, num_cams=args.views, target_size=args.size,
                          compile=args.compile, compile_cache=args.compile_cache)
    runs = []
    for count in args.gpus:
        out = work / f"out-{count}"
        with UtilisationSampler() as sampler:
            summary = run_scenes(template, scenes, out, workers=count, ray_address=os.environ.get("RAY_ADDRESS"))
        rate, start, end = steady_rate(summary["results"])
        run = {"workers": count, "how": summary["workers"], "ok": summary["ok"], "failed": summary["failed"],
               "wall_s": summary["wall_s"], "scenes_per_s": summary["scenes_per_s"], "steady_scenes_per_s": rate,
               "gpu_utilisation_pct": sampler.mean(start, end), "utilisation_source": sampler.source,
               "scene_seconds": [r.get("seconds") for r in summary["results"]],
               "errors": [r["error"] for r in summary["results"] if r["status"] != "ok"]}
        runs.append(run)
        print(f"{count} worker(s): {run['ok']}/{len(scenes)} ok, steady {rate} scenes/s, all {run['scenes_per_s']} "
              f"scenes/s, wall {run['wall_s']:.1f} s, GPU utilisation {run['gpu_utilisation_pct']}", flush=True)
    base = runs[0]["steady_scenes_per_s"]
    for run in runs:
        run["speedup"] = round(run["steady_scenes_per_s"] / base, 3) if base and run["steady_scenes_per_s"] else None
    import torch

    result = {"model": args.model_name, "precision": args.precision, "scenes": args.scenes, "views": args.views,
              "size": args.size, "compile": args.compile, "compile_cache": str(args.compile_cache or ""),
              "torch": torch.__version__, "python": platform.python_version(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs}
    print("speed-up: " + ", ".join(f"{r['workers']} -> {r['speedup']}x" for r in runs))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
