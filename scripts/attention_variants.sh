#!/usr/bin/env bash
# Builds the CUDA attention benchmark once per kernel-shape variant, for tuning on the GPU machine:
#
#   scripts/attention_variants.sh OUTDIR NAME="-DMACRO=V ..." [NAME="..."] ...
#
# Each NAME gets OUTDIR/bench_attention_NAME, compiled from bench/attention/attention_cuda_bench.cu
# with the configured build's flags (build/) plus the given macros (DRDIFF_CUDA_ATTENTION_WARPS,
# DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D64, ...), and ptxas's register and
# spill report in OUTDIR/ptxas_NAME.txt. Run them with the .deps runtime libraries on the GPU machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${DRDIFF_BUILD_DIR:-$root/build}
mkdir -p "$1"
out=$(cd "$1" && pwd)  # absolute: the link step runs in the build folder
shift
dir=$build/bench/CMakeFiles/drdiff.bench.attention.cuda.dir
[ -f "$dir/flags.make" ] || { echo "attention_variants: configure $build with DRDIFF_ENABLE_CUDA=ON first" >&2; exit 1; }
flags=$(sed -n 's/^CUDA_FLAGS = //p' "$dir/flags.make")
for spec in "$@"; do
  name=${spec%%=*}
  defs=${spec#*=}
  # shellcheck disable=SC2086
  nvcc $flags $defs -I"$root/include" -I"$build/include" -Xptxas -v -c \
    "$root/bench/attention/attention_cuda_bench.cu" -o "$out/$name.o" 2> "$out/ptxas_$name.txt"
  (cd "$build/bench" && g++ "$out/$name.o" -o "$out/bench_attention_$name" @"$dir/linkLibs.rsp" \
    -L/usr/local/cuda/targets/x86_64-linux/lib/stubs -L/usr/local/cuda/targets/x86_64-linux/lib)
  rm -f "$out/$name.o"
  echo "$name: $(grep -c spill "$out/ptxas_$name.txt") ptxas lines with spills"
done
