#!/usr/bin/env python3
"""Run VGGT through a TensorRT engine, ONNX Runtime or PyTorch: list I/O, infer, benchmark, compare, sweep engines."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vggt_trt.cli.common import add_bool_aliases, run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__)
    model = p.add_argument_group("model (one of)")
    model.add_argument("--engine", help="serialised TensorRT / TensorRT-RTX engine (.engine)")
    model.add_argument("--onnx", help="ONNX graph, run with ONNX Runtime")
    model.add_argument("--torch", action="store_true", help="our PyTorch VGGT (see --model-name)")
    model.add_argument("--engines-dir", help="benchmark every .engine under this folder and rank them")
    tm = p.add_argument_group("PyTorch model")
    tm.add_argument("--model-name", default="facebook/VGGT-1B", help="preset (tiny, vggt-1b), hub id or local dir")
    tm.add_argument("--weights", help="local checkpoint (model.safetensors / model.pt)")
    tm.add_argument("--random-init", action="store_true", help="seeded random weights, no download")
    tm.add_argument("--precision", default="fp32",
                    choices=("fp32", "tf32", "bf16-autocast", "fp16-autocast", "bf16", "fp16"))
    tm.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda, cuda:1")
    rt = p.add_argument_group("runtimes")
    rt.add_argument("--trt-backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"))
    rt.add_argument("--ort-providers", help="comma list: cpu, cuda, tensorrt (default: cuda if available, else cpu)")
    rt.add_argument("--ort-opt-level", default="basic", choices=("disable", "basic", "extended", "all"))
    data = p.add_argument_group("input (default: random)")
    data.add_argument("--images", help="image folder or glob, preprocessed to the model's input shape")
    data.add_argument("--npy", help=".npy with images [S,3,H,W] in [0,1]")
    data.add_argument("--preprocess", default="crop", choices=("crop", "pad"), help="for dynamic-shape models")
    data.add_argument("--num-cams", type=int, help="views for dynamic-shape models (random input default: 2)")
    data.add_argument("--size", type=int, help="square size for dynamic-shape models (default: the preset's)")
    data.add_argument("--seed", type=int, default=0)
    act = p.add_argument_group("actions")
    act.add_argument("--list-io", action="store_true", help="only list inputs and outputs")
    act.add_argument("--benchmark", action="store_true", help="time warm-up + iterations")
    act.add_argument("--warmup", type=int, default=3)
    act.add_argument("--iters", type=int, default=10)
    act.add_argument("--compare", help="reference backend: torch, onnx, engine (the one named by the other flag) "
                                       "or a .onnx/.engine path")
    act.add_argument("--save-outputs", help="write the outputs to this .npz")
    act.add_argument("--json", help="write every result as JSON to this file")
    p.add_argument("--log-dir", type=Path, default=None, help="also log to a file here")
    p.add_argument("-v", "--verbose", action="store_true")
    add_bool_aliases(p)
    return p


def run(args: argparse.Namespace) -> int:
    from vggt_trt.cli import infer as ic
    from vggt_trt.atomic import write_json_atomic
    from vggt_trt.accuracy import compare_outputs

    report: dict = {}
    if args.engines_dir:
        rows = ic.sweep_engines(args.engines_dir, args.warmup, args.iters, args.trt_backend, args.seed)
        print(ic.format_sweep(rows))
        report["sweep"] = rows
    else:
        with ic.runner_from_args(args) as runner:
            io = ic.list_io(runner)
            report["io"] = io
            print(f"{runner.name} ({runner.device})")
            for m in io["inputs"]:
                print(f"  input  {m['name']:<18} {str(m['shape']):<24} {m['dtype']}")
            for name in io["outputs"]:
                print(f"  output {name}")
            if not args.list_io:
                feeds, names = ic.load_feeds(runner, args.images, args.npy, args.preprocess, args.num_cams,
                                             args.size, args.seed)
                outputs = runner.infer(feeds)
                report["inference"] = {"views": names, "ms": runner.last_inference_ms,
                                       "outputs": {k: list(v.shape) for k, v in outputs.items()}}
                print(f"inference on {len(names)} views: {runner.last_inference_ms:.2f} ms")
                for k, v in outputs.items():
                    print(f"  {k:<18} {str(list(v.shape)):<24} min {v.min():.4g} max {v.max():.4g}")
                if args.save_outputs:
                    print(f"outputs written to {ic.save_outputs(args.save_outputs, outputs)}")
                if args.benchmark:
                    res = ic.benchmark(runner, feeds, args.warmup, args.iters).to_dict()
                    report["benchmark"] = res
                    print(ic.format_benchmark(res))
                if args.compare:
                    with ic.compare_runner(args) as ref_runner:
                        ref = ref_runner.infer(feeds)
                        image_hw = feeds[next(iter(feeds))].shape[-2:]
                        result = compare_outputs(ref, outputs, image_hw)
                        result.update(reference=ref_runner.info(), test=runner.info())
                        report["compare"] = result
                        print(ic.format_compare(result, ref_runner.name, runner.name))
    if args.json:
        write_json_atomic(args.json, report)
        print(f"results written to {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(lambda: run(args), args.log_dir, "trt_inference", args.verbose)


if __name__ == "__main__":
    sys.exit(main())
