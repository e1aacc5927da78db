#!/usr/bin/env bash
# Configures and builds DrDiff (library checks, tests, benchmarks, examples) in ${DRDIFF_BUILD_DIR:-build}.
# CUDA sources are compiled when nvcc is found (DRDIFF_ENABLE_CUDA=AUTO).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DRDIFF_BUILD_DIR:-$root/build}
jobs=${DRDIFF_JOBS:-$(nproc)}
cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DDRDIFF_ENABLE_CUDA="${DRDIFF_ENABLE_CUDA:-AUTO}" "$@"
cmake --build "$build" -j "$jobs"
