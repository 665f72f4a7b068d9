#!/usr/bin/env bash
# The whole product on the embedded synthetic dataset, within a wall-clock budget (README command 1):
# synthetic COCO -> MindRecord -> training (configs/demo.yaml) -> bbox/segm mAP -> MINDIR -> predictions.
#   bash scripts/run_demo.sh [--minutes N] [--images N] [--size HxW] [--out DIR] [--key value ...]
# Defaults: 30 minutes, 400 images, 128x192, demo_output/. All options are demo.py's (--help lists them).
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
export GLOG_v="${GLOG_v:-3}" PYTHONUNBUFFERED=1
exec "$root/.venv/bin/python" demo.py "$@"
