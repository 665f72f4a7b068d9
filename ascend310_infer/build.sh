#!/usr/bin/env bash
# Build the Ascend 310 runner into $BUILD_DIR/main (default: ascend310_infer/build/main).
# MindSpore inference API location: $MINDSPORE_PATH (MindSpore Lite root), else $LITE_HOME, else the
# directory of the installed `mindspore` Python package.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ms_path="${MINDSPORE_PATH:-${LITE_HOME:-}}"
if [ -z "$ms_path" ]; then
    ms_path="$(python3 -c 'import os, mindspore; print(os.path.dirname(mindspore.__file__))' 2>/dev/null)" || {
        echo "ERROR: set MINDSPORE_PATH to a MindSpore Lite package (or install mindspore)" >&2; exit 1; }
fi
build_dir="${BUILD_DIR:-$here/build}"
cmake -S "$here" -B "$build_dir" -DMINDSPORE_PATH="$ms_path" ${MS_OLD_CXX_ABI:+-DMS_OLD_CXX_ABI=ON}
cmake --build "$build_dir" -j "$(nproc)"
echo "built $build_dir/main"
