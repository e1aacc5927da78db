#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, and run the examples — a tour of
# every attention pattern (time, useful GFLOP/s, error against the float64 reference) and the
# scaling table for N = 1K..64K — and the solver convergence study (CSV + log-log PNG via gnuplot).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DRDIFF_BUILD_DIR:-$root/build}
"$root/scripts/install_deps.sh" gnuplot-nox
"$root/scripts/build.sh"
echo
"$build/examples/drdiff-attention-tour"
echo
"$build/examples/drdiff-attention-scaling" "${DRDIFF_MAX_N:-65536}"
echo
mkdir -p "$build/plots"
"$build/examples/drdiff-solver-convergence" "$build/plots"
