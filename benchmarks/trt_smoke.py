"""TensorRT-RTX smoke test on a GeForce/RTX GPU (Turing to Blackwell): one command, tiny engines, real checks.

Usage: PYTHONPATH=. python benchmarks/trt_smoke.py [--precisions fp32 fp16 bf16 fp8] [--device 0] [--json OUT.json]

For each precision it exports the tiny VGGT preset (2 views, 56 x 56, seeded random weights), casts or
quantises the graph, builds an engine for this GPU's compute capability and then checks:
engine validity (TensorRT-RTX get_engine_validity), outputs against ONNX Runtime on the fp32 graph
(relative L2 per output, stated bounds below), activation + first inference with no runtime cache, with
an empty one (written on exit) and with the saved one (must load), memory accounting (engine weights and
activations counted beside torch's buffers) and the precision report (requested type present in the
parsed network; the engine inspector's view is printed, advisory). Exits 0 when every check passes,
1 when one fails, and 0 with a "SKIP:" line naming the reason where it cannot run (no tensorrt_rtx,
no GPU, torch without CUDA, or a GPU TensorRT-RTX does not support, such as Hopper).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from vggt_trt.accuracy import tensor_errors
from vggt_trt.trt import backend as tb
from vggt_trt.errors import MissingDependencyError

# relative L2 of each output vs ONNX Runtime fp32 on the tiny preset (random weights); TensorRT may use TF32
REL_L2_BOUND = {"fp32": 1e-2, "fp16": 3e-2, "bf16": 8e-2, "fp8": 0.25}
MIN_CC = {"fp32": (7, 5), "fp16": (7, 5), "bf16": (8, 0), "fp8": (8, 9)}  # TensorRT-RTX support matrix
SHAPE = (2, 3, 56, 56)


def skip_reason(device: int) -> str | None:
    """Why the smoke test cannot run here; None when it can."""
    try:
        trt, info = tb.import_tensorrt("tensorrt-rtx")
    except MissingDependencyError as exc:
        return f"tensorrt_rtx is not installed ({exc})"
    count, reason = tb.cuda_device_count()
    gpu = tb.cuda_gpu(device) if count else None
    if gpu is None:
        return f"no NVIDIA GPU {device} here ({reason or f'{count} GPU(s) found'})"
    problem = tb.unsupported_gpu_reason(trt, info, gpu["compute_capability"])
    if problem:
        return f"GPU {device} ({gpu['name']}): {problem}"
    import torch

    if not torch.cuda.is_available():
        return f"torch {torch.__version__} has no CUDA support (install a CUDA build of torch)"
    return None


def make_graphs(work: Path, precisions: list[str]) -> dict[str, Path]:
    """The tiny fp32 graph and its fp16/bf16 casts and fp8 Q/DQ version."""
    from vggt_trt.graph import io as onnx_io
    from vggt_trt.graph.export import ExportSpec, export_onnx
    from vggt_trt.graph.precision_cast import cast_precision
    from vggt_trt.quant.calib import calibration_set
    from vggt_trt.model.weights import build_model

    report = export_onnx(build_model("tiny", random_init=True, seed=0), work / "tiny.onnx",
                         ExportSpec(num_cams=SHAPE[0], height=SHAPE[2], width=SHAPE[3], pcd_only=True))
    graphs = {"fp32": Path(report["path"])}
    for p in precisions:
        if p in ("fp16", "bf16"):
            cast, _ = cast_precision(onnx_io.load_onnx(graphs["fp32"]), p)
            graphs[p] = onnx_io.save_onnx(cast, work / f"tiny_{p}.onnx")
        elif p == "fp8":
            from vggt_trt.quant.ptq import quantize_onnx

            calib = calibration_set(None, SHAPE[0], SHAPE[2], SHAPE[3], num_batches=4, seed=0)
            quantize_onnx(graphs["fp32"], work / "tiny_fp8.onnx", "fp8", calib)
            graphs[p] = work / "tiny_fp8.onnx"
    return graphs


def first_call_seconds(engine: Path, feeds: dict, device: int, runtime_cache: bool) -> tuple[float, dict]:
    """Wall time of activate + first inference (TensorRT-RTX compiles kernels here) and the cache status."""
    from vggt_trt.runtime.trt_runner import TrtRunner

    t0 = time.perf_counter()
    with TrtRunner(engine, trt_backend="tensorrt-rtx", device_index=device, runtime_cache=runtime_cache) as runner:
        runner.infer(feeds)
        seconds = time.perf_counter() - t0
    return seconds, dict(runner.runtime_cache_status)  # "saved" is set on exit


def check_precision(p: str, graph: Path, work: Path, device: int, feeds: dict, ref: dict) -> dict:
    from vggt_trt.runtime.benchmark import benchmark
    from vggt_trt.runtime.trt_runner import TrtRunner
    from vggt_trt.trt.build import build_engine

    engine = work / f"tiny_{p}.engine"
    gpu = tb.cuda_gpu(device)  # its own target, not CURRENT: CURRENT is CUDA device 0, whatever --device says
    res = build_engine(graph, engine, p, backend="tensorrt-rtx", workspace_gb=2,
                       compute_capabilities=[gpu["compute_capability"]])
    engine.with_suffix(".json").write_text(json.dumps(res.to_dict()))
    checks: dict = {"build_s": res.build_seconds, "engine_mb": round(res.engine_bytes / 1e6, 2),
                    "network_dtypes": res.network_precision["dtypes"], "engine_precision": res.engine_precision,
                    "advisory_warnings": res.warnings}
    trt, _ = tb.import_tensorrt("tensorrt-rtx")
    validity = tb.engine_validity(trt, engine, tb.make_logger(trt))
    checks["validity"] = validity["validity"]
    failures = [] if validity["validity"] in ("VALID", "SUBOPTIMAL") else [f"engine validity {validity}"]
    if p != "fp32" and p not in res.network_precision["dtypes"]:
        failures.append(f"{p} absent from the parsed network")
    for old in work.glob(f"{engine.stem}.sm*.runtime.cache*"):  # from an earlier run in the same --work-dir
        old.unlink()
    no_cache, _ = first_call_seconds(engine, feeds, device, runtime_cache=False)
    empty_cache, first = first_call_seconds(engine, feeds, device, runtime_cache=True)
    warm_cache, second = first_call_seconds(engine, feeds, device, runtime_cache=True)
    checks["first_call_s"] = {"no_cache": round(no_cache, 3), "empty_cache": round(empty_cache, 3),
                              "saved_cache": round(warm_cache, 3)}
    checks["runtime_cache"] = {"first": first, "second": second}
    if not first.get("saved") or not second.get("loaded"):
        failures.append(f"runtime cache not saved and reloaded: {first} / {second}")
    with TrtRunner(engine, trt_backend="tensorrt-rtx", device_index=device) as runner:
        out = runner.infer(feeds)
        bench = benchmark(runner, feeds, warmup=2, iters=10)
        weights, activations = runner.weights_bytes, runner.activation_bytes()
    checks["memory"] = {"weights_mb": round(weights / 2**20, 2), "activations_mb": round(activations / 2**20, 2),
                        "peak_device_mb": round(bench.peak_device_memory_mb, 2), "method": bench.memory_method}
    checks["latency_ms"] = round(bench.latency_ms["median"], 3)
    if weights <= 0 or bench.peak_device_memory_mb * 2**20 < weights + activations:
        failures.append(f"memory accounting: weights {weights} B, activations {activations} B, "
                        f"peak {bench.peak_device_memory_mb} MB")
    errors = {name: tensor_errors(ref[name], out[name]) for name in ref}
    checks["rel_l2"] = {name: round(float(e["rel_l2"]), 5) for name, e in errors.items()}
    failures += [f"{name}: rel L2 {v} > {REL_L2_BOUND[p]}" for name, v in checks["rel_l2"].items()
                 if not v <= REL_L2_BOUND[p]]
    checks["failures"] = failures
    return checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "fp16", "bf16", "fp8"], choices=list(REL_L2_BOUND))
    ap.add_argument("--device", type=int, default=0, help="CUDA device index")
    ap.add_argument("--work-dir", type=Path, help="keep graphs and engines here (default: a temporary folder)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    reason = skip_reason(args.device)
    if reason:
        print(f"SKIP: {reason}")
        return 0
    from vggt_trt.runtime.ort_runner import OrtRunner

    gpu = tb.cuda_gpu(args.device)
    cc = tb.cc_tuple(gpu["compute_capability"])
    print(f"GPU {args.device}: {gpu['name']} (compute capability {gpu['compute_capability']}, "
          f"driver CUDA {gpu['driver_cuda_version']})")
    results: dict = {"gpu": gpu, "precisions": {}}
    runnable = [p for p in args.precisions if cc >= MIN_CC[p]]
    for p in sorted(set(args.precisions) - set(runnable)):
        print(f"{p:5s} SKIP: needs compute capability {MIN_CC[p][0]}.{MIN_CC[p][1]} or newer")
        results["precisions"][p] = {"skipped": "GPU too old for this precision"}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        graphs = make_graphs(work, runnable)
        feeds = {"images": np.random.default_rng(0).random(SHAPE, dtype=np.float32)}
        with OrtRunner(graphs["fp32"]) as ort_runner:
            ref = ort_runner.infer(feeds)
        for p in runnable:
            checks = check_precision(p, graphs[p], work, args.device, feeds, ref)
            results["precisions"][p] = checks
            first = checks["first_call_s"]
            print(f"{p:5s} {'FAIL' if checks['failures'] else 'ok  '} validity {checks['validity']:10s} "
                  f"rel L2 max {max(checks['rel_l2'].values()):.2e} (bound {REL_L2_BOUND[p]:g})  "
                  f"first call {first['no_cache']:.2f} s without cache, {first['saved_cache']:.2f} s with  "
                  f"weights {checks['memory']['weights_mb']} MB  median {checks['latency_ms']} ms")
            for line in checks["failures"] + [f"advisory: {w}" for w in checks["advisory_warnings"]]:
                print(f"      {line}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    failed = [p for p, c in results["precisions"].items() if c.get("failures")]
    print("FAILED: " + ", ".join(failed) if failed else "all checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
