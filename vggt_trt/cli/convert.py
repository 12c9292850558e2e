"""VGGT -> ONNX -> TensorRT engine, with sequence removal, simplification, precision graphs and a build report."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import InputError
from ..pipelines.convert import DEFAULT_NUM_CAMS, DEFAULT_SIZE, ConvertOptions, convert, or_default
from ..pipelines.torch_engine import TorchEngineOptions, build_torch_engine
from ..precisions import ALL_PRECISIONS, PRECISIONS, TORCH_ENGINE_PRECISIONS
from ..quant.modes import QUANT_MODES
from .common import (IMAGE_SIDE, NON_NEGATIVE_INT, OPSET, POSITIVE_FLOAT, POSITIVE_INT, ArgumentParser,
                     choice_list, reject_together, run_cli)


TORCH_ONLY = tuple(p for p in TORCH_ENGINE_PRECISIONS if p not in PRECISIONS)  # --backend torch only

def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="vggt_to_trt.py", description=__doc__)
    io = p.add_argument_group("input and output")
    io.add_argument("--export", action="store_true", help="export VGGT to ONNX first (otherwise use --onnx-in)")
    io.add_argument("--onnx-in", type=Path, help="existing VGGT ONNX graph (skips export)")
    io.add_argument("--output-dir", type=Path, default=Path("onnx_exports"), help="artifacts (default: onnx_exports)")
    io.add_argument("--keep-intermediate", action="store_true",
                    help="keep the raw, .NOSEQ and .simp graphs (default: removed after a successful run unless one "
                         "is the final graph; they share one external data file)")
    io.add_argument("--log-dir", type=Path, default=Path("logs"), help="run logs (default: logs)")
    geo = p.add_argument_group("model geometry")
    geo.add_argument("--num-cams", type=POSITIVE_INT,
                     help="views per forward (default 8; with --onnx-in the graph's, and a different value is "
                          "refused); with --min-cams/--max-cams the optimum of the range")
    geo.add_argument("--min-cams", type=POSITIVE_INT,
                     help="with --max-cams: one graph and engine for any view count in min..max (a dynamic view "
                          "axis and a TensorRT optimisation profile; stem vggt-<min>to<max>x3xHxW)")
    geo.add_argument("--max-cams", type=POSITIVE_INT, help="largest view count of a dynamic view axis (see --min-cams)")
    geo.add_argument("--height", type=IMAGE_SIDE,
                     help="input height, multiple of 14 (default 518; with --onnx-in the graph's)")
    geo.add_argument("--width", type=IMAGE_SIDE,
                     help="input width, multiple of 14 (default 518; with --onnx-in the graph's)")
    geo.add_argument("--pcd-only", action="store_true", help="only camera + depth heads (point clouds)")
    geo.add_argument("--model-name", default="facebook/VGGT-1B", help="preset (tiny, vggt-1b), hub id or local dir")
    geo.add_argument("--weights", type=Path, help="local checkpoint (model.safetensors / model.pt)")
    geo.add_argument("--random-init", action="store_true", help="seeded random weights, no download")
    geo.add_argument("--seed", type=NON_NEGATIVE_INT, default=0, help="seed for --random-init")
    geo.add_argument("--opset", type=OPSET, default=18)
    prec = p.add_argument_group("precision")
    prec.add_argument("--precision", type=choice_list(PRECISIONS + TORCH_ONLY), metavar="P[,P...]",
                      help=f"precisions to build from one export, comma-separated ({', '.join(PRECISIONS)}; default "
                           f"fp16; {', '.join(TORCH_ONLY)} with --backend torch); published together when all of "
                           "them succeed")
    prec.add_argument("--all-precisions", action="store_true", help="fp16, bf16, fp8, int8, int4 from one export")
    prec.add_argument("--quant-mode", default="none", choices=QUANT_MODES, help="quantisation applied before export")
    prec.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                      help="check cast/quantised graphs against fp32 on CPU (default: when the graph is small)")
    build = p.add_argument_group("TensorRT build")
    build.add_argument("--workspace-gb", type=POSITIVE_FLOAT, default=32)
    build.add_argument("--opt-level", type=int, default=5, choices=range(0, 6))
    build.add_argument("--max-aux-streams", type=NON_NEGATIVE_INT, default=4)
    build.add_argument("--no-simplify", action="store_true", help="skip ONNX simplification")
    build.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx", "torch"),
                       help="TensorRT flavour (auto: tensorrt when importable, else tensorrt-rtx), or torch: a "
                            "compiled PyTorch engine <stem>_<precision>.torchcache (no ONNX; fp32/bf16/fp16/bf16-all)")
    build.add_argument("--device", default="auto", help="--backend torch: device to compile for (auto, cuda, cpu)")
    build.add_argument("--compute-capability", dest="compute_capabilities", action="append", default=[],
                       help="TensorRT-RTX target, e.g. 8.9 or 12.0 (repeatable; default: portable)")
    build.add_argument("--skip-build", action="store_true", help="stop after the final ONNX graph")
    cal = p.add_argument_group("calibration (int8 / fp8 / int4)")
    cal.add_argument("--calib-data", help="image dir, glob, .npy or .npz (default: synthetic, with a warning)")
    cal.add_argument("--calib-batches", type=POSITIVE_INT, default=32)
    cal.add_argument("--calib-seed", type=NON_NEGATIVE_INT, default=1337)
    cal.add_argument("--calib-cpu", action="store_true", help="keep calibration batches on the host")
    cal.add_argument("--int8-calibrator", action="store_true",
                     help="TensorRT 10 only: classic IInt8EntropyCalibrator2 with calibration cache instead of Q/DQ")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def build_torch(args: argparse.Namespace) -> int:
    if args.min_cams is not None or args.max_cams is not None:
        raise InputError("--min-cams/--max-cams build one ONNX graph and TensorRT engine for a range of view counts; "
                         "--backend torch compiles for one input shape: drop them, or use --backend tensorrt-rtx "
                         "(or tensorrt)")
    if args.export or args.onnx_in or args.all_precisions or args.quant_mode != "none":
        raise InputError("--backend torch compiles the PyTorch model directly: drop --export/--onnx-in/"
                         "--all-precisions/--quant-mode")
    report = build_torch_engine(TorchEngineOptions(
        output_dir=args.output_dir, num_cams=or_default(args.num_cams, DEFAULT_NUM_CAMS),
        height=or_default(args.height, DEFAULT_SIZE), width=or_default(args.width, DEFAULT_SIZE),
        pcd_only=args.pcd_only, model_name=args.model_name, weights=args.weights, random_init=args.random_init,
        seed=args.seed, precision=args.precision[0], device=args.device))
    logging.getLogger("vggt_to_trt").info("%s %s: %s", report["stem"], report["precision"], report["path"])
    return 0


CONTRADICTIONS = (
    ("--all-precisions", "--precision", "--all-precisions builds fp16, bf16, fp8, int8 and int4; --precision names "
                                        "the precisions to build"),
    ("--weights", "--random-init", "--random-init replaces the checkpoint with seeded random weights"),
)
# export flags with --onnx-in describe the graph (run_all_exports.sh passes the same flags to its --onnx-in runs):
# --pcd-only is checked against the graph, like --num-cams/--height/--width (pipelines/convert.py)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, with contradictory combinations refused (one line, exit 2) and defaults filled in."""
    parser = build_parser()
    args = parser.parse_args(argv)
    reject_together(args, parser, *CONTRADICTIONS)
    if args.backend == "torch" and args.precision and len(args.precision) > 1:
        parser.error(f"--backend torch compiles one precision per run, not --precision {','.join(args.precision)}")
    torch_only = [p for p in args.precision or () if p in TORCH_ONLY]
    if torch_only and args.backend != "torch":
        parser.error(f"--precision {torch_only[0]} is a PyTorch mode: it needs --backend torch")
    args.precision = args.precision or ("fp16",)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def job() -> int:
        if args.backend == "torch":
            return build_torch(args)
        if args.onnx_in is not None and (args.weights is not None or args.random_init):
            logging.getLogger("vggt_to_trt").info("--weights/--random-init are not used with --onnx-in: the graph "
                                                  "holds its weights")
        opts = ConvertOptions(
            output_dir=args.output_dir, export=args.export, onnx_in=args.onnx_in, num_cams=args.num_cams,
            min_cams=args.min_cams, max_cams=args.max_cams,
            height=args.height, width=args.width, pcd_only=args.pcd_only, model_name=args.model_name,
            weights=args.weights, random_init=args.random_init, seed=args.seed, opset=args.opset,
            precisions=ALL_PRECISIONS if args.all_precisions else args.precision, quant_mode=args.quant_mode,
            workspace_gb=args.workspace_gb, opt_level=args.opt_level, max_aux_streams=args.max_aux_streams,
            no_simplify=args.no_simplify, backend=args.backend, skip_build=args.skip_build,
            compute_capabilities=tuple(args.compute_capabilities), calib_data=args.calib_data,
            calib_batches=args.calib_batches, calib_seed=args.calib_seed, calib_cpu=args.calib_cpu,
            int8_calibrator=args.int8_calibrator,
            verify=args.verify, keep_intermediate=args.keep_intermediate,
        )
        for report in convert(opts):
            logging.getLogger("vggt_to_trt").info(
                "%s %s: %s", report["stem"], report["precision"],
                report.get("engine", {}).get("path") or report["onnx"]["path"])
        return 0

    return run_cli(job, args.log_dir, "vggt_to_trt", args.verbose)

