#!/usr/bin/env bash
# Data-parallel training, one process per device, data sharded by rank.
#
#   Ascend (rank table, as in the recipe):
#     sh run_distribute_train.sh RANK_TABLE_FILE [PRETRAINED_CKPT] [-- extra train.py arguments]
#     Started on each server of the rank table; starts that server's devices (the server is SERVER_ID, its
#     index or server_id in the table, else the one whose server_id is an address of this host) with
#     RANK_ID / DEVICE_ID / RANK_SIZE (all devices of the table) set; logs in train_parallel<rank>/,
#     checkpoints (rank 0) in train_parallel0/checkpoint.
#   msrun (CPU, GPU or Ascend without a rank table):
#     sh run_distribute_train.sh --workers N [--nodes M --node_rank R --master_addr ADDR [--master_port P]]
#                                [PRETRAINED_CKPT] [-- extra train.py arguments]
#     N workers on this host; with --nodes, the same command on each of M hosts (R = 0..M-1, ADDR the
#     address of node 0) trains N*M workers. DEVICE_TARGET (auto default: Ascend, then GPU, then CPU) and
#     MASTER_PORT (8118) from the environment; output in train_parallel/, worker logs in train_parallel/msrun_log/.
# PRETRAINED_CKPT: converted ResNet50 backbone or Mask R-CNN checkpoint; "" or "none" trains from scratch.
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail

usage() {
    echo "usage: sh $0 RANK_TABLE_FILE [PRETRAINED_CKPT|none] [-- extra train.py arguments]" >&2
    echo "       sh $0 --workers N [--nodes M --node_rank R --master_addr ADDR [--master_port P]]" \
         "[PRETRAINED_CKPT|none] [-- extra train.py arguments]" >&2
    exit 2
}
integer() {    # name value minimum(0|1)
    [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -ge "$3" ] && return
    echo "error: $1 needs a $( [ "$3" = 0 ] && echo non-negative || echo positive ) integer, got '$2'" >&2; usage
}

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PATH="$root/.venv/bin:$PATH" GLOG_v="${GLOG_v:-3}" PYTHONUNBUFFERED=1

[ $# -ge 1 ] || usage
workers="" rank_table="" nodes=1 node_rank=0 master_addr="" master_port="${MASTER_PORT:-8118}"
if [ "$1" = "--workers" ]; then
    while [ $# -gt 0 ]; do
        case "$1" in
            --workers|--nodes|--node_rank|--master_addr|--master_port)
                [ $# -ge 2 ] || usage
                case "$1" in
                    --workers) workers="$2"; integer --workers "$2" 1 ;;
                    --nodes) nodes="$2"; integer --nodes "$2" 1 ;;
                    --node_rank) node_rank="$2"; integer --node_rank "$2" 0 ;;
                    --master_addr) master_addr="$2" ;;
                    --master_port) master_port="$2"; integer --master_port "$2" 1 ;;
                esac
                shift 2 ;;
            *) break ;;
        esac
    done
    [ "$node_rank" -lt "$nodes" ] || { echo "error: --node_rank must be below --nodes ($nodes), got $node_rank" >&2; usage; }
    if [ "$nodes" -gt 1 ] && [ -z "$master_addr" ]; then
        echo "error: --nodes $nodes needs --master_addr, the address of node 0" >&2; usage
    fi
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
    device="${DEVICE_TARGET:-auto}"
    case "$device" in auto|CPU|GPU|Ascend) ;; *) echo "error: DEVICE_TARGET must be auto, CPU, GPU or Ascend, got '$device'" >&2; exit 2 ;; esac
    output="${TRAIN_OUTPUT_DIR:-$PWD/train_parallel}"
    mkdir -p "$output"
    echo "msrun: node $node_rank of $nodes, $workers workers here ($((workers * nodes)) in all), device $device," \
         "master ${master_addr:-127.0.0.1}:$master_port; output in $output, worker logs in $output/msrun_log"
    # train.py leaves the scheduler to node 0: msrun starts one wherever master_addr is a local address
    export MSRUN_NODE_RANK="$node_rank"
    exec msrun --worker_num="$((workers * nodes))" --local_worker_num="$workers" --node_rank="$node_rank" \
        --master_addr="${master_addr:-127.0.0.1}" --master_port="$master_port" \
        --log_dir="$output/msrun_log" --join=True "$root/train.py" --run_distribute \
        --device_target "$device" --output_dir "$output" "${pretrained_args[@]}" "$@"
fi

[ -f "$rank_table" ] || { echo "error: RANK_TABLE_FILE '$rank_table' does not exist" >&2; exit 1; }
rank_table="$(realpath "$rank_table")"
# first line RANK_SIZE, then "rank_id device_id" per device of this server
table="$(python "$root/src/rank_table.py" "$rank_table")" || exit 1
export RANK_TABLE_FILE="$rank_table"
RANK_SIZE="$(echo "$table" | head -n 1)"
export RANK_SIZE
devices="$(echo "$table" | tail -n +2)"
checkpoints="$PWD/train_parallel0/checkpoint"
echo "Ascend: $(echo "$devices" | wc -l) of $RANK_SIZE devices of $rank_table on this server;" \
     "logs in train_parallel<rank>/, checkpoints (rank 0) in $checkpoints"
pids=() ranks=()
while read -r rank device_id; do
    out="$PWD/train_parallel$rank"
    mkdir -p "$out"
    RANK_ID="$rank" DEVICE_ID="$device_id" python "$root/train.py" --run_distribute --device_target Ascend \
        --output_dir "$out" --save_checkpoint_path "$checkpoints" "${pretrained_args[@]}" "$@" > "$out/log" 2>&1 &
    pids+=($!) ranks+=("$rank")
done <<< "$devices"
status=0
for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "rank ${ranks[$i]} failed, see train_parallel${ranks[$i]}/log" >&2; status=1; }
done
exit $status
