#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, and run the examples — a tour of
# every attention pattern (time, useful GFLOP/s, error against the float64 reference) and the
# scaling table for N = 1K..64K —, the solver convergence study (CSV + log-log PNG via gnuplot) and
# text generation with the default model preset (drdiff-generate).
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
echo
# Text generation with the default preset (random weights from the seed: the pipeline and its speed,
# not meaningful text), 512 new tokens after a prompt, DPM-Solver++ 2M in 10 steps.
"$build/examples/drdiff-generate" --prompt "DrDiff generates long text by diffusion. " --length 512 --seed 1 --progress
