#!/usr/bin/env bash
# Start an interactive container with the Ascend devices, driver and the data/model directories mounted.
# Usage: sh docker_start.sh IMAGE DATA_DIR MODEL_DIR
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
if [ $# -ne 3 ]; then
    echo "Usage: sh docker_start.sh IMAGE DATA_DIR MODEL_DIR" >&2
    exit 1
fi
image="$1"; data_dir="$(realpath -m "$2")"; model_dir="$(realpath -m "$3")"
for dir in "$data_dir" "$model_dir"; do
    [ -d "$dir" ] || { echo "ERROR: '$dir' is not a directory" >&2; exit 1; }
done
devices=()
for dev in /dev/davinci[0-9]* /dev/davinci_manager /dev/devmm_svm /dev/hisi_hdc; do
    [ -e "$dev" ] && devices+=("--device=$dev")
done
[ ${#devices[@]} -gt 0 ] || echo "WARNING: no Ascend devices (/dev/davinci*) found on this host" >&2
mkdir -p /root/ascend/log
exec docker run -it --ipc=host "${devices[@]}" \
    -v /usr/local/Ascend/driver:/usr/local/Ascend/driver \
    -v /usr/local/Ascend/add-ons/:/usr/local/Ascend/add-ons/ \
    -v /var/log/npu/:/usr/slog \
    -v /root/ascend/log:/root/ascend/log \
    -v "$data_dir":"$data_dir" \
    -v "$model_dir":"$model_dir" \
    "$image" /bin/bash
