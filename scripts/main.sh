#!/usr/bin/env bash
# The main job on a fresh machine: install what is missing, build, and run the examples — a tour of
# every attention pattern (time, useful GFLOP/s, error against the float64 reference) and the
# scaling table for N = 1K..64K —, the solver convergence study (CSV + log-log PNG via gnuplot) and
# text generation with the trained model in models/drdiff-text (drdiff-generate).
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
# Text from the trained model that ships in models/drdiff-text (models/drdiff-text/README.md): a
# prompt, then 1,024 new tokens by DPM-Solver++ 2M in the model's 20 steps, on the CPU, with tokens/s.
"$build/examples/drdiff-generate" --model "$root/models/drdiff-text" \
  --prompt "${DRDIFF_PROMPT:-The kernel documentation describes}" --length "${DRDIFF_LENGTH:-1024}" \
  --seed "${DRDIFF_SEED:-1}" --progress
