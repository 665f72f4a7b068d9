#!/usr/bin/env bash
# Evaluate a checkpoint on COCO (bbox + segm mAP). Outputs and the log go to ./eval/.
# Usage: sh run_eval.sh [VALIDATION_JSON_FILE] [CHECKPOINT_PATH] [--key value ...]
#   Extra arguments go to eval.py, e.g. --config tiny or --device_target Ascend.
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
if [ $# -lt 2 ]; then
    echo "Usage: sh run_eval.sh [VALIDATION_JSON_FILE] [CHECKPOINT_PATH] [--key value ...]" >&2
    exit 1
fi
ann_file="$(realpath -m "$1")"
checkpoint="$(realpath -m "$2")"
shift 2
for path in "$ann_file" "$checkpoint"; do
    [ -f "$path" ] || { echo "ERROR: '$path' is not a file" >&2; exit 1; }
done
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}"
mkdir -p eval
echo "evaluating $checkpoint on $ann_file; log: $(pwd)/eval/eval.log"
GLOG_v="${GLOG_v:-3}" "$python" "$root/eval.py" --checkpoint_path "$checkpoint" --ann_file "$ann_file" \
    --output_dir eval "$@" 2>&1 | tee eval/eval.log
