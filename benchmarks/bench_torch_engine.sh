#!/usr/bin/env bash
# The PyTorch engine through the command lines, as a user runs them (CUDA GPU): build the compiled artifact,
# start a fresh process on it with empty local compile caches (only the artifact supplies kernels), the
# same with --cuda-graph, and eager with and without --cuda-graph. Each step's JSON and log land in OUT_DIR;
# wall.txt holds each command's wall time (process start -> exit). Compile caches go under CACHE_ROOT.
# Usage: benchmarks/bench_torch_engine.sh OUT_DIR [PRECISION]
# Environment: PYTHON, ITERS, VIEWS, SIZE, CACHE_ROOT, STEPS (default: all of build compiled compiled-cudagraph
# eager eager-cudagraph; the compiled steps need the artifact of the build step).
set -euo pipefail
out=${1:?usage: $0 OUT_DIR [PRECISION]}
prec=${2:-bf16}
python=${PYTHON:-python}
iters=${ITERS:-30}
views=${VIEWS:-8}
size=${SIZE:-518}
cache_root=${CACHE_ROOT:-$out/caches}
steps=" ${STEPS:-build compiled compiled-cudagraph eager eager-cudagraph} "
mkdir -p "$out"
model=(--model-name vggt-1b --random-init)
artifact="$out/vggt-${views}x3x${size}x${size}-pcd_${prec}.torchcache"

timed() {  # timed NAME CMD...: run CMD, log to OUT/NAME.log, append "NAME seconds" to wall.txt
    local name=$1; shift
    [[ $steps == *" $name "* ]] || return 0
    local t0; t0=$(date +%s%N)
    "$@" >"$out/$name.log" 2>&1 || { echo "$name failed (log: $out/$name.log)"; tail -20 "$out/$name.log"; }
    echo "$name $(( ($(date +%s%N) - t0) / 1000000 )) ms" | tee -a "$out/wall.txt"
}

fresh_caches() {  # empty local Inductor/Triton caches so that only the artifact can supply kernels
    export TORCHINDUCTOR_CACHE_DIR="$cache_root/$1/inductor" TRITON_CACHE_DIR="$cache_root/$1/triton"
}

fresh_caches build
timed build "$python" vggt_to_trt.py --backend torch "${model[@]}" --num-cams "$views" --height "$size" \
    --width "$size" --pcd-only --precision "$prec" --output-dir "$out"
fresh_caches compiled
timed compiled "$python" trt_inference.py --engine "$artifact" --benchmark --iters "$iters" \
    --json "$out/compiled.json"
fresh_caches compiled-cudagraph
timed compiled-cudagraph "$python" trt_inference.py --engine "$artifact" --cuda-graph --benchmark \
    --iters "$iters" --json "$out/compiled_cudagraph.json"
timed eager "$python" trt_inference.py --torch "${model[@]}" --precision "$prec" --num-cams "$views" \
    --size "$size" --benchmark --iters "$iters" --json "$out/eager.json"
timed eager-cudagraph "$python" trt_inference.py --torch "${model[@]}" --precision "$prec" --num-cams "$views" \
    --size "$size" --cuda-graph --benchmark --iters "$iters" --json "$out/eager_cudagraph.json"
