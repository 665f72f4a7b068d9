#!/usr/bin/env bash
# Ascend 310 inference of an exported model over a COCO set: preprocess -> build -> run -> postprocess.
# Usage: sh run_infer_310.sh [MINDIR_OR_AIR_PATH] [DATA_PATH] [ANN_FILE] [DEVICE_ID] [--key value ...]
#   DATA_PATH: directory of the images named in ANN_FILE; DEVICE_ID defaults to 0; extra arguments are
#   config overrides for the python steps (e.g. --config tiny). An AIR file is first converted to OM by atc.
# Outputs in the current directory: preprocess_result/, result_files/, *.log; COCO mAP in acc.log.
# Environment: MINDSPORE_PATH (MindSpore Lite root for the build), BUILD_DIR, PYTHON.
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
usage="Usage: sh run_infer_310.sh [MINDIR_OR_AIR_PATH] [DATA_PATH] [ANN_FILE] [DEVICE_ID] [--key value ...]"
if [ $# -lt 3 ]; then echo "$usage" >&2; exit 1; fi
model="$(realpath -m "$1")"; data_path="$(realpath -m "$2")"; ann_file="$(realpath -m "$3")"; shift 3
device_id=0
if [ $# -gt 0 ] && [[ "$1" =~ ^[0-9]+$ ]]; then device_id="$1"; shift; fi
[ -f "$model" ] || { echo "ERROR: model '$model' is not a file" >&2; exit 1; }
[ -d "$data_path" ] || { echo "ERROR: DATA_PATH '$data_path' is not a directory" >&2; exit 1; }
[ -f "$ann_file" ] || { echo "ERROR: ANN_FILE '$ann_file' is not a file" >&2; exit 1; }
case "$model" in
    *.mindir|*.air) ;;
    *) echo "ERROR: model '$model' must be a .mindir or .air file (export.py)" >&2; exit 1 ;;
esac

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$( [ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3 )}"
if [ -f /usr/local/Ascend/ascend-toolkit/set_env.sh ]; then
    # shellcheck disable=SC1091
    source /usr/local/Ascend/ascend-toolkit/set_env.sh
fi
export GLOG_v="${GLOG_v:-3}"

echo "[1/4] preprocess -> preprocess_result/ (preprocess.log)"
"$python" "$root/preprocess.py" --data_path "$data_path" --ann_file "$ann_file" \
    --output_dir preprocess_result "$@" > preprocess.log 2>&1 || { tail -n 5 preprocess.log >&2; exit 1; }

if [[ "$model" == *.air ]]; then
    echo "[1b] atc: AIR -> OM (atc.log)"
    atc --model="$model" --framework=1 --output=maskrcnn --soc_version=Ascend310 --log=error \
        > atc.log 2>&1 || { tail -n 20 atc.log >&2; exit 1; }
    model="$(pwd)/maskrcnn.om"
fi

echo "[2/4] build the runner (build.log)"
export BUILD_DIR="${BUILD_DIR:-$root/ascend310_infer/build}"
bash "$root/ascend310_infer/build.sh" > build.log 2>&1 || { tail -n 20 build.log >&2; exit 1; }

echo "[3/4] inference on device $device_id -> result_files/ (infer.log)"
"$BUILD_DIR/main" --model_path="$model" --input_dir=preprocess_result \
    --result_dir=result_files --device_id="$device_id" > infer.log 2>&1 || { tail -n 20 infer.log >&2; exit 1; }
tail -n 1 infer.log

echo "[4/4] postprocess -> acc.log"
"$python" "$root/postprocess.py" --result_dir result_files --input_dir preprocess_result \
    --ann_file "$ann_file" --output_dir . "$@" > acc.log 2>&1 || { tail -n 5 acc.log >&2; exit 1; }
grep -A 1 "Evaluate annotation type" acc.log | grep -v "^--" || true
grep "Average Precision  (AP) @\[ IoU=0.50:0.95 | area=   all" acc.log
