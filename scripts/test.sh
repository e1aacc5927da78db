#!/usr/bin/env bash
# Builds everything and runs the whole test suite through CTest. GPU tests report "skipped" when
# no CUDA device is present.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DRDIFF_BUILD_DIR:-$root/build}
"$root/scripts/install_deps.sh" clang libclang-rt-dev  # clang: the fuzz test of the weights loader
"$root/scripts/install_python.sh"  # PyTorch and the rest of python/requirements.txt: the python/tests
"$root/scripts/build.sh"
cd "$build"
ctest --output-on-failure -j "${DRDIFF_JOBS:-$(nproc)}"
