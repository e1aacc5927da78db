#!/usr/bin/env bash
# The GPU lane, run on the GPU machine (CUDA 13, cmake, Google Benchmark, PyTorch; no Eigen, no
# Catch2, no registry). Carry the git-ignored .deps/ folder made here by scripts/gpu_deps.sh.
#
#   scripts/gpu_lane.sh [full|quick|tests|bench]
#
# Builds the CUDA tests and benchmarks (sm_90a; the attention tests also for plain sm_90), runs the CUDA tests, compute-sanitizer memcheck and
# racecheck on the attention and anchor tests, the solver-update, MoE, rounding, model and attention benchmarks (JSON in $OUT or out/), the
# side-by-side comparison with PyTorch (bench/compare/compare.py), and prints a short table.
# `quick` skips the sanitizers and the PyTorch comparison; `tests` runs the tests and sanitizers only; `bench` the benchmarks and the
# comparison only (the two halves of `full`, for machines that limit one command's time).
# DRDIFF_GPU_PREBUILT=1: take the binaries already in the build folder (built on the dev machine with
# scripts/build.sh and carried; they run there) instead of configuring and building, and run the test programs directly.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
deps=$root/.deps
out=${OUT:-$root/out}
build=${DRDIFF_GPU_BUILD_DIR:-$root/build-gpu}
mode=${1:-full}
case "$mode" in full|quick|tests|bench) ;; *) echo "gpu_lane: unknown mode '$mode' (full, quick, tests or bench)" >&2; exit 2 ;; esac
[ -d "$deps/include/catch2" ] || { echo "gpu_lane: no .deps/ (run scripts/gpu_deps.sh on the dev machine and carry .deps)" >&2; exit 1; }
mkdir -p "$out"
export LD_LIBRARY_PATH="$deps/lib/runtime:${LD_LIBRARY_PATH:-}"

nvidia-smi -q > "$out/nvidia-smi.txt" 2>&1 || true
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$out/gpu.txt"

# The CUDA test programs and benchmarks (one list for the build, the prebuilt run and the benchmarks).
tests=(attention.cuda attention.cuda.mma attention.policy.cuda attention.backward.cuda solver.cuda router.cuda anchor.cuda model.cuda
       concurrency.cuda distributed.cuda)
benches=(attention solver moe round model)
if [ -z "${DRDIFF_GPU_PREBUILT:-}" ]; then
  cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$deps" -DDRDIFF_ENABLE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a -DDRDIFF_BUILD_EXAMPLES=OFF > "$out/configure.log"
  cmake --build "$build" -j "$(nproc)" --target "${tests[@]/#/drdiff.test.}" \
    $(printf 'drdiff.bench.%s.cuda ' "${benches[@]}") > "$out/build.log" 2>&1 \
    || { tail -50 "$out/build.log"; exit 1; }
fi

status=0
if [ "$mode" != bench ]; then
echo "== CUDA tests"
if [ -z "${DRDIFF_GPU_PREBUILT:-}" ]; then
  (cd "$build" && ctest -L cuda --output-on-failure -R 'drdiff.test.(attention|solver|router|anchor|model|concurrency|distributed)') > "$out/ctest_cuda.log" 2>&1 || status=1
  grep -E 'tests passed|Failed|\*\*\*' "$out/ctest_cuda.log" || true
else
  for t in "${tests[@]}"; do
    "$build/test/drdiff.test.$t" > "$out/test_$t.log" 2>&1 && echo "drdiff.test.$t: $(grep -E "tests passed|test cases" "$out/test_$t.log" | tail -1)" \
      || { echo "drdiff.test.$t: FAILED (see $out/test_$t.log)"; status=1; }
  done
fi
fi
if [ "$mode" != bench ] && python3 -c "import torch" 2>/dev/null; then
  echo "== the PyTorch operator on CUDA tensors (python/tests/test_attention_op_cuda.py)"
  (cd "$root/python" && python3 -m pytest -q tests/test_attention_op_cuda.py) > "$out/pytest_op_cuda.log" 2>&1 \
    && tail -1 "$out/pytest_op_cuda.log" || { tail -30 "$out/pytest_op_cuda.log"; status=1; }
fi
if [ "$mode" = full ] || [ "$mode" = tests ]; then
  echo "== compute-sanitizer"
  for tool in memcheck racecheck; do
    compute-sanitizer --tool $tool --error-exitcode 9 "$build/test/drdiff.test.attention.cuda" \
      "CUDA attention matches the reference for every pattern" > "$out/sanitizer_$tool.log" 2>&1 \
      && echo "$tool (attention): clean" || { echo "$tool: FAILED (see $out/sanitizer_$tool.log)"; status=1; }
    compute-sanitizer --tool $tool --error-exitcode 9 "$build/test/drdiff.test.anchor.cuda" \
      > "$out/sanitizer_anchor_$tool.log" 2>&1 \
      && echo "$tool (anchor): clean" || { echo "$tool: FAILED (see $out/sanitizer_anchor_$tool.log)"; status=1; }
    compute-sanitizer --tool $tool --error-exitcode 9 "$build/test/drdiff.test.attention.backward.cuda" \
      "CUDA attention_backward matches the reference for every pattern*" > "$out/sanitizer_backward_$tool.log" 2>&1 \
      && echo "$tool (backward): clean" || { echo "$tool: FAILED (see $out/sanitizer_backward_$tool.log)"; status=1; }
  done
  compute-sanitizer --tool memcheck --error-exitcode 9 "$build/test/drdiff.test.distributed.cuda" \
    "distributed attention on one GPU, ranks as threads, equals one call" > "$out/sanitizer_distributed_memcheck.log" 2>&1 \
    && echo "memcheck (distributed): clean" || { echo "memcheck (distributed): FAILED (see $out/sanitizer_distributed_memcheck.log)"; status=1; }
fi
[ "$mode" = tests ] && exit $status
echo "== benchmarks"
"$build/bench/drdiff.bench.solver.cuda" --benchmark_out="$out/bench_solver_cuda.json" --benchmark_out_format=json \
  2>&1 | grep -E '^BM_' | tee "$out/bench_solver_cuda.txt" || status=1
"$build/bench/drdiff.bench.moe.cuda" --benchmark_out="$out/bench_moe_cuda.json" --benchmark_out_format=json \
  2>&1 | grep -E '^BM_' | tee "$out/bench_moe_cuda.txt" || status=1
"$build/bench/drdiff.bench.round.cuda" --benchmark_out="$out/bench_round_cuda.json" --benchmark_out_format=json \
  2>&1 | grep -E '^BM_' | tee "$out/bench_round_cuda.txt" || status=1
"$build/bench/drdiff.bench.model.cuda" --benchmark_out="$out/bench_model_cuda.json" --benchmark_out_format=json \
  2>&1 | grep -E '^BM_' | tee "$out/bench_model_cuda.txt" || status=1
"$build/bench/drdiff.bench.attention.cuda" --benchmark_out="$out/bench_cuda.json" --benchmark_out_format=json \
  > "$out/bench_cuda.txt" 2>&1 || status=1
if { [ "$mode" = full ] || [ "$mode" = bench ]; } && python3 -c "import torch" 2>/dev/null; then
  echo "== PyTorch comparison"
  python3 "$root/bench/compare/compare.py" --ours "$out/bench_cuda.json" | tee "$out/compare.txt" || status=1
fi
python3 "$root/bench/tables_cuda.py" "$out/bench_cuda.json" | tee "$out/table_cuda.md"
exit $status
