#!/usr/bin/env bash
# Data-parallel training, one process per device, data sharded by rank.
#
#   Ascend (rank table, as in the recipe):
#     bash scripts/run_distribute_train.sh RANK_TABLE_FILE [PRETRAINED_CKPT] [-- extra train.py arguments]
#     One process per device of the (single-server) rank table with RANK_ID / DEVICE_ID / RANK_SIZE set;
#     logs in train_parallel<i>/, checkpoints (rank 0) in train_parallel0/checkpoint.
#   CPU / GPU (msrun):
#     bash scripts/run_distribute_train.sh --workers N [PRETRAINED_CKPT] [-- extra train.py arguments]
#     N worker processes on this machine via msrun; DEVICE_TARGET (CPU default, or GPU) and MASTER_PORT
#     (8118) from the environment; output in train_parallel/, worker logs in train_parallel/msrun_log/.
# PRETRAINED_CKPT: converted ResNet50 backbone or Mask R-CNN checkpoint; "" or "none" trains from scratch.
set -euo pipefail

usage() {
    echo "usage: bash $0 RANK_TABLE_FILE [PRETRAINED_CKPT|none] [-- extra train.py arguments]" >&2
    echo "       bash $0 --workers N [PRETRAINED_CKPT|none] [-- extra train.py arguments]" >&2
    exit 2
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH" GLOG_v="${GLOG_v:-3}" PYTHONUNBUFFERED=1

[ $# -ge 1 ] || usage
workers=""
rank_table=""
if [ "$1" = "--workers" ]; then
    [ $# -ge 2 ] || usage
    workers="$2"
    [[ "$workers" =~ ^[1-9][0-9]*$ ]] || { echo "error: --workers needs a positive integer, got '$workers'" >&2; usage; }
    shift 2
else
    rank_table="$1"
    shift
fi
pretrained=""
if [ $# -gt 0 ] && [ "$1" != "--" ]; then
    pretrained="$1"
    shift
fi
if [ $# -gt 0 ]; then
    [ "$1" = "--" ] || usage
    shift
fi

pretrained_args=()
if [ -n "$pretrained" ] && [ "$pretrained" != "none" ]; then
    [ -f "$pretrained" ] || { echo "error: PRETRAINED_CKPT '$pretrained' does not exist" >&2; exit 1; }
    pretrained_args=(--pre_trained "$(realpath "$pretrained")")
fi

if [ -n "$workers" ]; then
    device="${DEVICE_TARGET:-CPU}"
    case "$device" in CPU|GPU) ;; *) echo "error: msrun path supports DEVICE_TARGET CPU or GPU, got '$device'" >&2; exit 2 ;; esac
    output="${TRAIN_OUTPUT_DIR:-$PWD/train_parallel}"
    mkdir -p "$output"
    echo "msrun: $workers $device workers, output in $output, worker logs in $output/msrun_log"
    exec msrun --worker_num="$workers" --local_worker_num="$workers" --master_port="${MASTER_PORT:-8118}" \
        --log_dir="$output/msrun_log" --join=True "$root/train.py" --run_distribute \
        --device_target "$device" --output_dir "$output" "${pretrained_args[@]}" "$@"
fi

[ -f "$rank_table" ] || { echo "error: RANK_TABLE_FILE '$rank_table' does not exist" >&2; exit 1; }
rank_table="$(realpath "$rank_table")"
# "rank_id device_id" per line, from the single server of the rank table
if ! devices="$(python - "$rank_table" <<'EOF'
import json, sys
path = sys.argv[1]
try:
    servers = json.load(open(path))["server_list"]
    if len(servers) != 1:
        sys.exit(f"error: {path}: this script starts one server's devices; found {len(servers)} servers")
    for device in servers[0]["device"]:
        print(device["rank_id"], device["device_id"])
except (ValueError, KeyError, TypeError) as err:
    sys.exit(f"error: {path} is not an HCCL rank table (server_list/device/rank_id/device_id): {err!r}")
EOF
)"; then
    exit 1
fi
export RANK_TABLE_FILE="$rank_table"
export RANK_SIZE="$(echo "$devices" | wc -l)"
checkpoints="$PWD/train_parallel0/checkpoint"
echo "Ascend: $RANK_SIZE devices from $rank_table; logs in train_parallel<i>/, checkpoints in $checkpoints"
pids=()
while read -r rank device_id; do
    out="$PWD/train_parallel$rank"
    mkdir -p "$out"
    RANK_ID="$rank" DEVICE_ID="$device_id" python "$root/train.py" --run_distribute --device_target Ascend \
        --output_dir "$out" --save_checkpoint_path "$checkpoints" "${pretrained_args[@]}" "$@" > "$out/log" 2>&1 &
    pids+=($!)
done <<< "$devices"
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "rank $i failed, see train_parallel$i/log" >&2; status=1; }
done
exit $status
