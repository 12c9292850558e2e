#!/usr/bin/env bash
# Sweep every quantisation mode and precision through vggt_to_trt.py.
#
# For each quant mode (QUANT_MODES, default: none torch-int8-dynamic bitsandbytes-8bit bitsandbytes-nf4
# bitsandbytes-fp4 modelopt-fp8) two configurations run, writing to $BASE_OUTPUT/<quant_mode>/:
#   all-precisions   --export ... --all-precisions
#   fp32             --precision fp32 (reuses that mode's exported ONNX via --onnx-in when it exists)
# Each configuration's output goes to $BASE_OUTPUT/<quant_mode>/logs/<config>.log (and the console).
#
# Outcomes per configuration:
#   ok           exit 0
#   unavailable  exit 3 (MissingDependencyError: e.g. bitsandbytes without a GPU, ModelOpt not installed).
#                Not a stop: the mode's remaining configurations are skipped (they need the same thing) and
#                the sweep goes on with the next mode. With STRICT=1 it is treated as a failure.
#   FAILED       any other exit code: the sweep stops here, naming the configuration and its log.
# The summary table is printed at the end in every case. Exit status: 0 when nothing failed (unavailable
# modes included), otherwise the failing configuration's exit code.
#
# Environment (defaults in brackets): PYTHON [python] NUM_CAMS [8] HEIGHT [518] WIDTH [518]
# MODEL [facebook/VGGT-1B; "tiny" = the small preset, seeded random weights] BASE_OUTPUT [onnx_exports] CALIB_DATA [] CALIB_BATCHES [32]
# CALIB_SEED [1337] CALIB_CPU [0] PCD_ONLY [0] EXTRA_ARGS [] QUANT_MODES [all six] STRICT [0]
# CONVERTER [./vggt_to_trt.py next to this script] (tests point it at a stand-in)
set -uo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
NUM_CAMS="${NUM_CAMS:-8}"
HEIGHT="${HEIGHT:-518}"
WIDTH="${WIDTH:-518}"
MODEL="${MODEL:-facebook/VGGT-1B}"
BASE_OUTPUT="${BASE_OUTPUT:-onnx_exports}"
CALIB_DATA="${CALIB_DATA:-}"
CALIB_BATCHES="${CALIB_BATCHES:-32}"
CALIB_SEED="${CALIB_SEED:-1337}"
CALIB_CPU="${CALIB_CPU:-0}"
PCD_ONLY="${PCD_ONLY:-0}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
STRICT="${STRICT:-0}"
QUANT_MODES="${QUANT_MODES:-none torch-int8-dynamic bitsandbytes-8bit bitsandbytes-nf4 bitsandbytes-fp4 modelopt-fp8}"
CONVERTER="${CONVERTER:-$HERE/vggt_to_trt.py}"

stem="vggt-${NUM_CAMS}x3x${HEIGHT}x${WIDTH}"
common=(--num-cams "$NUM_CAMS" --height "$HEIGHT" --width "$WIDTH" --model-name "$MODEL"
        --calib-batches "$CALIB_BATCHES" --calib-seed "$CALIB_SEED")
[[ -n "$CALIB_DATA" ]] && common+=(--calib-data "$CALIB_DATA")
[[ "$CALIB_CPU" == "1" ]] && common+=(--calib-cpu)
if [[ "$PCD_ONLY" == "1" ]]; then
    common+=(--pcd-only)
    stem="${stem}-pcd"
fi
# shellcheck disable=SC2206  # EXTRA_ARGS is a list of flags on purpose
extra=($EXTRA_ARGS)

summary=()
status=0
stopped=""

last_error() {  # the last ERROR line of a log (what vggt_to_trt.py said), else its last line
    local line
    line="$(grep -E 'ERROR|Error' "$1" | tail -n 1)"
    [[ -z "$line" ]] && line="$(tail -n 1 "$1")"
    printf '%s' "${line:-no output}"
}

run_config() {  # mode config args... ; sets rc
    local mode="$1" config="$2"
    shift 2
    local out="$BASE_OUTPUT/$mode" log="$BASE_OUTPUT/$mode/logs/$config.log"
    mkdir -p "$out/logs"
    echo "=== [$mode / $config] $PYTHON $CONVERTER $* (log: $log)"
    local t0=$SECONDS
    "$PYTHON" "$CONVERTER" "$@" --output-dir "$out" --log-dir "$out/logs" --quant-mode "$mode" \
        "${common[@]}" "${extra[@]}" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local took=$((SECONDS - t0))
    case "$rc" in
        0) summary+=("$(printf '%-20s %-15s ok           %5ss  %s' "$mode" "$config" "$took" "$out")") ;;
        3) summary+=("$(printf '%-20s %-15s unavailable  %5ss  unavailable here: %s' "$mode" "$config" "$took" \
                      "$(last_error "$log")")") ;;
        *) summary+=("$(printf '%-20s %-15s FAILED(%s)    %5ss  %s' "$mode" "$config" "$rc" "$took" \
                      "$(last_error "$log")")") ;;
    esac
}

for mode in $QUANT_MODES; do
    run_config "$mode" all-precisions --export --all-precisions
    if [[ "$rc" == "3" && "$STRICT" != "1" ]]; then
        summary+=("$(printf '%-20s %-15s skipped             (mode unavailable here)' "$mode" fp32)")
        continue
    fi
    if [[ "$rc" != "0" ]]; then
        status=$rc
        stopped="$mode / all-precisions (log: $BASE_OUTPUT/$mode/logs/all-precisions.log)"
        break
    fi
    if [[ -f "$BASE_OUTPUT/$mode/$stem.onnx" ]]; then
        run_config "$mode" fp32 --onnx-in "$BASE_OUTPUT/$mode/$stem.onnx" --precision fp32
    else
        run_config "$mode" fp32 --export --precision fp32
    fi
    if [[ "$rc" != "0" && ( "$rc" != "3" || "$STRICT" == "1" ) ]]; then
        status=$rc
        stopped="$mode / fp32 (log: $BASE_OUTPUT/$mode/logs/fp32.log)"
        break
    fi
done

echo
echo "=== run_all_exports summary (BASE_OUTPUT=$BASE_OUTPUT, MODEL=$MODEL, ${NUM_CAMS}x3x${HEIGHT}x${WIDTH})"
printf '%-20s %-15s %-12s %6s  %s\n' "quant mode" "configuration" "result" "time" "detail"
for line in "${summary[@]}"; do
    echo "$line"
done
if [[ -n "$stopped" ]]; then
    echo "STOPPED at the first failing configuration: $stopped (exit code $status)"
fi
exit "$status"
