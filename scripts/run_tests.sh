#!/usr/bin/env bash
# Install into .venv if needed, then run the test suite (extra arguments go to pytest).
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/setup_env.sh"
cd "$root"
export PATH="$root/.venv/bin:$PATH" GLOG_v="${GLOG_v:-3}"
exec python -m pytest -q -n "${MASKRCNN_TEST_WORKERS:-2}" --dist loadgroup "$@" tests
