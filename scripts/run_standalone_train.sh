#!/usr/bin/env bash
# Single-device training; output (log, loss_0.log, metrics.jsonl, checkpoint/) under ./train.
#   sh run_standalone_train.sh [PRETRAINED_CKPT] [DEVICE_TARGET] [-- extra train.py arguments]
# PRETRAINED_CKPT: converted ResNet50 backbone (src/convert_checkpoint.py) or Mask R-CNN checkpoint;
#                  "" or "none" trains from scratch. DEVICE_TARGET: auto (default: Ascend, then GPU, then
#                  CPU), CPU, GPU or Ascend. Relative paths in the extra arguments are relative to here.
# Example: sh scripts/run_standalone_train.sh none CPU -- --config tiny --coco_root data/synthetic_coco
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

usage() {
    echo "usage: sh $0 [PRETRAINED_CKPT|none] [auto|CPU|GPU|Ascend] [-- extra train.py arguments]" >&2
    exit 2
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
positional=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    positional+=("$1")
    shift
done
[ $# -gt 0 ] && shift                              # drop the "--"
[ ${#positional[@]} -le 2 ] || usage

pretrained="${positional[0]:-}"
device="${positional[1]:-auto}"
case "$device" in auto|CPU|GPU|Ascend) ;; *) echo "error: DEVICE_TARGET must be CPU, GPU or Ascend, got '$device' (or auto: the best available)" >&2; usage ;; esac
pretrained_args=()
if [ -n "$pretrained" ] && [ "$pretrained" != "none" ]; then
    [ -f "$pretrained" ] || { echo "error: PRETRAINED_CKPT '$pretrained' does not exist" >&2; exit 1; }
    pretrained_args=(--pre_trained "$(realpath "$pretrained")")
fi

output="${TRAIN_OUTPUT_DIR:-$PWD/train}"
mkdir -p "$output"
export PATH="$root/.venv/bin:$PATH" GLOG_v="${GLOG_v:-3}" PYTHONUNBUFFERED=1
echo "training (device $device), output in $output (log: $output/log)"
python "$root/train.py" --device_target "$device" --output_dir "$output" "${pretrained_args[@]}" "$@" 2>&1 | tee "$output/log"
