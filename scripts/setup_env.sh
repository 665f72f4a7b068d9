#!/usr/bin/env bash
# Create .venv and install requirements once (later calls skip that unless a requirements file changed), then
# build our CPU kernels (`python -m src.ops.build`: a no-op when up to date; if it cannot build it says why in one
# line and MindSpore's operators run).
# Started by `sh` (dash on Debian/Ubuntu): run again under bash, which this script is written for.
[ -n "${BASH_VERSION:-}" ] || exec bash "$0" "$@"
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.requirements.sha256"
want="$(cat "$root/requirements.txt" "$root/requirements-dev.txt" "$root/requirements-kernels.txt" | sha256sum | cut -d' ' -f1)"
if ! { [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; }; then
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$root/requirements-dev.txt"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps -r "$root/requirements-kernels.txt"
    echo "$want" > "$stamp"
fi
cd "$root"
GLOG_v="${GLOG_v:-3}" "$venv/bin/python" -m src.ops.build
