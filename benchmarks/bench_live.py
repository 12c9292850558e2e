#!/usr/bin/env python3
"""Live loop throughput: synthetic cameras -> VGGT bootstrap + Depth Anything workers -> fused map, by stage.

Defaults are the issue's H100 configuration: 8 cameras at 518x518, PyTorch backends with seeded random
weights (VGGT ``vggt-1b`` preset, Depth Anything with the sizes of V2-Small, preset ``vits``), on CUDA.
Cameras are replayed in-process through the sources' capture interface (no OpenCV devices needed), so the
numbers are the pipeline's, not a camera's frame rate. Batch 0 runs VGGT (bootstrap, reported apart);
``--vggt-every N`` adds refreshes. Output: JSON with per-stage latency (median/mean/p90) and batches/s.

    PYTHONPATH=. python benchmarks/bench_live.py --json bench_live.json
    PYTHONPATH=. python benchmarks/bench_live.py --device cpu --vggt tiny --depth tiny --size 56 --batches 3
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import tempfile
import time
from pathlib import Path

NEEDED = {"torch": "torch", "numpy": "numpy", "PIL": "pillow", "plyfile": "plyfile", "cv2": "opencv-python-headless",
          "transformers": "transformers"}


def check_environment(device: str) -> None:
    """Fail fast, naming every missing package and a missing GPU."""
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        sys.exit(f"bench_live: missing packages: {', '.join(missing)} "
                 f"(pip install -r requirements.txt -r requirements-live.txt)")
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"bench_live: --device {device} but torch {torch.__version__} sees no CUDA GPU "
                 "(use --device cpu with --vggt tiny --depth tiny for a smoke test)")


class SyntheticCamera:
    """A capture that serves pre-rendered textured BGR frames instantly (cycles through ``frames``)."""

    def __init__(self, frames: list) -> None:
        self.frames, self.pos = frames, 0

    def isOpened(self) -> bool:  # noqa: N802
        return True

    def read(self):
        frame = self.frames[self.pos % len(self.frames)]
        self.pos += 1
        return True, frame

    def release(self) -> None:
        self.pos = 0


def render_frames(cam: int, n: int, size: int):
    import numpy as np

    rng = np.random.default_rng(cam)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    out = []
    for f in range(n):
        base = np.stack([np.sin((xx + 3 * f) / (17 + cam)), np.cos(yy / (23 + 2 * cam)), np.sin((xx + yy) / 31)], -1)
        out.append((127 + 100 * base + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8))
    return out


def seed_identity_fits(calib_path: Path) -> list[str]:
    """Give cameras whose random-weight fit was rejected scale 1 / shift 0, so the map path does real work."""
    doc = json.loads(calib_path.read_text())
    seeded = []
    for name, cam in doc["cameras"].items():
        if cam.get("scale") is None:
            cam["scale"], cam["shift"] = 1.0, 0.0
            seeded.append(name)
    calib_path.write_text(json.dumps(doc))
    return seeded


def describe(summary: dict, wall_s: float, warmup: int) -> dict:
    """End-to-end rates from when each batch finished (not a sum of stage medians), after ``warmup`` batches."""
    lat = summary["latency_ms"]
    ends = summary["batch_end_s"]
    steady = None
    if len(ends) > warmup + 1:
        steady = (len(ends) - 1 - warmup) / (ends[-1] - ends[warmup])
    return {
        "batches": summary["batches"], "wall_s": round(wall_s, 3),
        "batches_per_s_whole_loop": summary["batches_per_s"], "frames_per_s_whole_loop": summary["frames_per_s"],
        "steady_state_batches_per_s": steady, "warmup_batches_excluded": warmup,
        "batch_latency_ms": lat.get("batch"), "latency_ms": lat, "vggt_runs": summary["vggt"]["runs"],
        "startup_ms": summary["startup_ms"], "memory_mib": summary["memory_mib"],
        "map": summary["map"] | {"voxels_per_batch": summary["map"]["voxels_per_batch"][-3:]},
    }


def viewer_ab(run, pairs: int, warmup: int) -> dict:
    """``pairs`` steady runs without, then with, the viewer, alternating; each arm's rates and the ratio of medians."""
    import numpy as np

    rates: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(pairs):
        for arm in ("without", "with"):
            summary, wall_s = run(arm == "with")
            rates[arm].append(describe(summary, wall_s, warmup)["steady_state_batches_per_s"])
            print(f"viewer {arm:7s}: {rates[arm][-1]:.1f} batches/s", flush=True)
    medians = {arm: float(np.median(r)) for arm, r in rates.items()}
    return {"order": "without, with; repeated", "steady_batches_per_s": rates, "median": medians,
            "with_over_without": medians["with"] / medians["without"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-cams", type=int, default=8)
    p.add_argument("--size", type=int, default=518, help="frame and model input size (square, multiple of 14)")
    p.add_argument("--batches", type=int, default=30, help="lock-step batches (the first bootstraps VGGT)")
    p.add_argument("--vggt", default="vggt-1b", help="VGGT preset (random weights)")
    p.add_argument("--depth", default="vits", help="Depth Anything preset (random weights): vits or tiny")
    p.add_argument("--precision", default="fp32", help="VGGT torch precision (fp32, bf16-autocast, fp16, ...)")
    p.add_argument("--depth-precision", default="fp32", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--depth-workers", type=int, default=1, help="Depth Anything runners sharing a batch")
    p.add_argument("--depth-compile", action="store_true", help="torch.compile Depth Anything")
    p.add_argument("--warmup-batches", type=int, default=10, help="batches left out of the steady-state rate")
    p.add_argument("--viewer", action="store_true", help="publish the map to a live viewer (viser; it takes at most 10 updates a second)")
    p.add_argument("--viewer-port", type=int, default=8093)
    p.add_argument("--viewer-ab", type=int, default=0, metavar="PAIRS",
                   help="after the bootstrap, PAIRS steady runs without then with the viewer, alternating, in this "
                        "process (the viewer's cost without the noise between machines and processes)")
    p.add_argument("--vggt-every", type=int, default=0)
    p.add_argument("--pixel-stride", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, help="write the results here")
    args = p.parse_args(argv)
    if args.viewer_ab < 0:
        p.error(f"--viewer-ab must be >= 0 (pairs of runs), not {args.viewer_ab}")
    check_environment(args.device)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    import torch

    from vggt_trt.pipelines.live import LiveOptions, run_live
    from vggt_trt.pipelines.sources import CameraSpec
    from vggt_trt.runtime.torch_runner import TorchRunner

    cams = [CameraSpec(f"cam{i:02d}", i, live=False) for i in range(args.num_cams)]
    frames = {c.name: render_frames(i, 4, args.size) for i, c in enumerate(cams)}
    vggt = TorchRunner(model_name=args.vggt, random_init=True, precision=args.precision, device=args.device)
    viewer = None
    if args.viewer or args.viewer_ab:
        from vggt_trt.view.live import LiveViewer

        viewer = LiveViewer(port=args.viewer_port).__enter__()
    with tempfile.TemporaryDirectory() as tmp:
        def run(max_batches: int, calib: Path | None, viewer=viewer) -> tuple[dict, float]:
            opts = LiveOptions(source="webcams", out_dir=Path(tmp), model_name=args.vggt, device=args.device,
                               depth_model=args.depth, depth_random_init=True, depth_precision=args.depth_precision,
                               depth_workers=args.depth_workers, depth_compile=args.depth_compile,
                               viewer=viewer, max_batches=max_batches, vggt_every=args.vggt_every,
                               target_size=args.size, pixel_stride=args.pixel_stride, save_batches=False,
                               stall_timeout=600.0, per_camera_calib=calib)
            t0 = time.perf_counter()
            summary = run_live(opts, cameras=cams, capture_factory=lambda spec: SyntheticCamera(frames[spec.name]),
                               vggt_runner=vggt)
            return summary, time.perf_counter() - t0

        warmup = min(args.warmup_batches, args.batches - 2)
        bootstrap, bootstrap_s = run(args.batches, None, viewer if args.viewer else None)
        calib_path = Path(tmp) / "per_camera_calib.json"
        seeded = seed_identity_fits(calib_path)
        steady_summary, steady_s = run(args.batches, calib_path, viewer if args.viewer else None)
        ab = viewer_ab(lambda with_viewer: run(args.batches, calib_path, viewer if with_viewer else None),
                       args.viewer_ab, warmup) if args.viewer_ab else None
    if viewer is not None:
        viewer.close()
    result = {
        "viewer": viewer.stats() if viewer is not None else None,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "bootstrap_run": describe(bootstrap, bootstrap_s, min(args.warmup_batches, args.batches - 2)),
        "steady_run": describe(steady_summary, steady_s, min(args.warmup_batches, args.batches - 2)) | {"cameras_seeded_with_identity_fit": seeded},
        "depth_workers": steady_summary["depth"]["workers"],
        "viewer_ab": ab,
        "note": ("random weights: timing only. bootstrap_run: VGGT on the first batch, then Depth Anything; with "
                 "random weights the scale/shift fits are usually rejected (no correlation), so its map may stay "
                 "empty. steady_run: same cameras, calibration file reused with scale 1 / shift 0 seeded for "
                 "rejected cameras, so every batch unprojects and fuses points (VGGT bootstrap skipped)."),
    }
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
