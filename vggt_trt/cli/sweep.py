"""Sweep every quantisation mode and precision through vggt_to_trt.py (run_all_exports.sh calls this).

Each quant mode runs two configurations into BASE_OUTPUT/<mode>/ (all-precisions, then fp32 from the
mode's exported ONNX), each logged to BASE_OUTPUT/<mode>/logs/<config>.log. Quant modes are independent:
JOBS=N runs N at once as local processes (capped by available memory: MEM_PER_JOB_GIB each, default 16 for
full-size builds and 1 for MODEL=tiny), RAY_ADDRESS (local, auto or a cluster address; pip install -r
requirements-scale.txt) runs each as a Ray task asking for CPUS_PER_JOB CPUs, that memory and, where the
configuration uses a GPU (GPUS_PER_JOB, default: full TensorRT or CUDA builds, calibration where GPUs
exist unless CALIB_CPU=1), one GPU. Under Ray,
BASE_OUTPUT and this toolkit must be on storage every node sees at the same path: checked before starting.
A failing configuration is reported and the others go on; FAIL_FAST=1 stops at the first failure, STRICT=1
also counts "unavailable" (exit 3: a missing dependency) as one and stops there. The summary table lists
every configuration with its result, time and where it ran; BASE_OUTPUT/sweep.json has the same as JSON.
Exit status: 0 when nothing failed, else the first failing configuration's exit code.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from pathlib import Path

from ..pipelines.sweep import QUANT_MODES_DEFAULT, SweepOptions, run_sweep, summary_table
from .common import (IMAGE_SIDE, NON_NEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, ArgumentParser, add_ray_arguments,
                     env_default, ray_kwargs, run_cli)

ROOT = Path(__file__).resolve().parents[2]


def flag(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="run_all_exports.sh", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to build (environment variable in brackets)")
    g.add_argument("--python", default=env_default("PYTHON", sys.executable),
                   help="[PYTHON] interpreter for the converter")
    g.add_argument("--converter", type=Path, default=env_default("CONVERTER", str(ROOT / "vggt_to_trt.py"), Path),
                   help="[CONVERTER] default: vggt_to_trt.py of this toolkit")
    g.add_argument("--base-output", type=Path, default=env_default("BASE_OUTPUT", "onnx_exports", Path),
                   help="[BASE_OUTPUT] default onnx_exports; under Ray a folder every node sees (shared storage)")
    g.add_argument("--num-cams", type=POSITIVE_INT, default=env_default("NUM_CAMS", "8"), help="[NUM_CAMS]")
    g.add_argument("--height", type=IMAGE_SIDE, default=env_default("HEIGHT", "518"), help="[HEIGHT]")
    g.add_argument("--width", type=IMAGE_SIDE, default=env_default("WIDTH", "518"), help="[WIDTH]")
    g.add_argument("--model", default=env_default("MODEL", "facebook/VGGT-1B"),
                   help="[MODEL] default facebook/VGGT-1B; tiny: the small preset with seeded random weights")
    g.add_argument("--pcd-only", action="store_true", default=env_default("PCD_ONLY", "0", flag), help="[PCD_ONLY=1]")
    g.add_argument("--calib-data", default=env_default("CALIB_DATA", "") or "", help="[CALIB_DATA]")
    g.add_argument("--calib-batches", type=POSITIVE_INT, default=env_default("CALIB_BATCHES", "32"),
                   help="[CALIB_BATCHES]")
    g.add_argument("--calib-seed", type=NON_NEGATIVE_INT, default=env_default("CALIB_SEED", "1337"),
                   help="[CALIB_SEED]")
    g.add_argument("--calib-cpu", action="store_true", default=env_default("CALIB_CPU", "0", flag),
                   help="[CALIB_CPU=1]")
    g.add_argument("--extra-args", default=env_default("EXTRA_ARGS", "") or "",
                   help="[EXTRA_ARGS] more vggt_to_trt.py flags, e.g. '--opt-level 3'")
    g.add_argument("--quant-modes", default=env_default("QUANT_MODES", " ".join(QUANT_MODES_DEFAULT)),
                   help="[QUANT_MODES] space-separated (default: all six)")
    g.add_argument("--precisions", default=env_default("PRECISIONS", ""),
                   help="[PRECISIONS] e.g. 'fp16 bf16': one configuration each instead of all-precisions "
                        "(the first exports; fp32 always runs last)")
    r = p.add_argument_group("how to run")
    r.add_argument("--strict", action="store_true", default=env_default("STRICT", "0", flag),
                   help="[STRICT=1] an unavailable mode is a failure; stops at the first failure")
    r.add_argument("--fail-fast", action="store_true", default=env_default("FAIL_FAST", "0", flag),
                   help="[FAIL_FAST=1] stop at the first failing configuration (default: report it, go on)")
    r.add_argument("--jobs", type=POSITIVE_INT, default=env_default("JOBS", "1"),
                   help="[JOBS] quant modes at once as local processes (capped by memory)")
    r.add_argument("--mem-per-job-gib", type=POSITIVE_FLOAT, default=env_default("MEM_PER_JOB_GIB"),
                   help="[MEM_PER_JOB_GIB] peak memory of one configuration (default 16 full-size, 1 tiny)")
    r.add_argument("--cpus-per-job", type=POSITIVE_FLOAT, default=env_default("CPUS_PER_JOB", "1"),
                   help="[CPUS_PER_JOB] CPUs a Ray task asks for (default 1)")
    r.add_argument("--gpus-per-job", type=int, choices=(0, 1), default=env_default("GPUS_PER_JOB"),
                   help="[GPUS_PER_JOB] 0 or 1 (default: 1 for --backend tensorrt / torch on CUDA, and for "
                        "calibration without CALIB_CPU=1 where GPUs exist)")
    add_ray_arguments(p)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def options_from_args(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(
        base_output=args.base_output, python=args.python, converter=args.converter, num_cams=args.num_cams,
        height=args.height, width=args.width, model=args.model, calib_data=args.calib_data,
        calib_batches=args.calib_batches, calib_seed=args.calib_seed, calib_cpu=args.calib_cpu,
        pcd_only=args.pcd_only, extra_args=shlex.split(args.extra_args), quant_modes=args.quant_modes.split(),
        precisions=(args.precisions or "").split(),
        strict=args.strict, fail_fast=args.fail_fast or args.strict, jobs=args.jobs,
        ray_address=args.ray_address or None, mem_per_job_gib=args.mem_per_job_gib, cpus_per_job=args.cpus_per_job,
        gpus_per_job=args.gpus_per_job, ray_kwargs=ray_kwargs(args))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> int:
        opts = options_from_args(args)
        results, status = run_sweep(opts)
        print("\n" + summary_table(results, opts), flush=True)
        return status

    return run_cli(job, None, "run_all_exports", args.verbose)


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
