#!/usr/bin/env bash
# Sweep every quantisation mode and precision through vggt_to_trt.py: a thin front over
# vggt_trt/cli/sweep.py (python -m vggt_trt.cli.sweep --help lists every flag and variable).
#
# For each quant mode (QUANT_MODES, default: none torch-int8-dynamic bitsandbytes-8bit bitsandbytes-nf4
# bitsandbytes-fp4 modelopt-fp8) two configurations run, writing to $BASE_OUTPUT/<quant_mode>/:
#   all-precisions   --export ... --all-precisions
#   fp32             --precision fp32 (reuses that mode's exported ONNX via --onnx-in when it exists)
# Each configuration's output goes to $BASE_OUTPUT/<quant_mode>/logs/<config>.log.
#
# Outcomes per configuration:
#   ok           exit 0
#   unavailable  exit 3 (MissingDependencyError: e.g. ModelOpt not installed). The mode's fp32 configuration
#                is skipped; with STRICT=1 it is a failure and the sweep stops there.
#   FAILED       any other exit code: reported with its log; the other configurations go on
#                (FAIL_FAST=1 or STRICT=1: the sweep stops at the first failure).
# The summary table (result, time, where each configuration ran) is printed at the end in every case and
# written as $BASE_OUTPUT/sweep.json. Exit status: 0 when nothing failed, else the first failure's exit code.
#
# Concurrency: JOBS=N runs N quant modes at once as local processes (capped so N configurations at their
# memory peak fit: MEM_PER_JOB_GIB, default 16 full-size, 1 for MODEL=tiny). RAY_ADDRESS=local|auto|host:port
# runs each mode as a Ray task (pip install -r requirements-scale.txt); on a cluster BASE_OUTPUT and this
# toolkit must be on storage every node sees, at the same path (checked before anything runs).
#
# Environment (defaults in brackets): PYTHON [.venv/bin/python next to this script, else python3] NUM_CAMS [8] HEIGHT [518] WIDTH [518]
# MODEL [facebook/VGGT-1B; "tiny" = the small preset, seeded random weights] BASE_OUTPUT [onnx_exports] CALIB_DATA []
# CALIB_BATCHES [32] CALIB_SEED [1337] CALIB_CPU [0] PCD_ONLY [0] EXTRA_ARGS [] QUANT_MODES [all six] STRICT [0]
# FAIL_FAST [0] JOBS [1] MEM_PER_JOB_GIB [] CPUS_PER_JOB [1] GPUS_PER_JOB [auto] RAY_ADDRESS [] RAY_NUM_CPUS []
# RAY_NUM_GPUS [] RAY_OBJECT_STORE_MB [] CONVERTER [./vggt_to_trt.py next to this script] (tests use a stand-in)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$HERE/.venv/bin/python" ]; then PYTHON="$HERE/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHON
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m vggt_trt.cli.sweep "$@"
