#!/usr/bin/env bash
# Install into .venv if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH" GLOG_v="${GLOG_v:-3}"
exec python -m pytest -q "$@" tests
