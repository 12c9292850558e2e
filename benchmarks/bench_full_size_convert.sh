#!/usr/bin/env bash
# Full-size conversion on this machine: VGGT-1B sizes with seeded random weights, 8 x 518 x 518.
# Runs vggt_to_trt.py under GNU time (wall time, peak RSS of the whole run); the build report
# <stem>_<prec>.json holds per-stage times and the process peak RSS after each stage.
# MEMORY_LIMIT=6G runs it under that hard memory limit (benchmarks/with_memory_limit.sh; root only).
# Usage: benchmarks/bench_full_size_convert.sh OUT_DIR [extra vggt_to_trt.py flags, e.g. --pcd-only]
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [flags]}
shift
python=${PYTHON:-python}
limit=()
[ -n "${MEMORY_LIMIT:-}" ] && limit=("$(dirname "$0")/with_memory_limit.sh" "$MEMORY_LIMIT")
mkdir -p "$out"
"${limit[@]}" /usr/bin/time -v "$python" vggt_to_trt.py --export --random-init --model-name vggt-1b --num-cams 8 \
    --height 518 --width 518 --precision fp16 --output-dir "$out" --log-dir "$out/logs" "$@" \
    2> >(tee "$out/time.txt" >&2)
ls -l "$out" | tee "$out/files.txt"
