// The fused solver update on the CPU: bytes moved per second against a plain copy of the same
// state measured in the same binary. Argument: terms (1 = DDIM, 2 = 2M, 3 = 3M, 4 = SDE-2M).

#include <drdiff/cpu/solver.hpp>

#include <benchmark/benchmark.h>

#include <vector>

using namespace drdiff;

namespace {

constexpr std::size_t kN = std::size_t(1) << 24;  // 16M fp32 values

void BM_solver_update_cpu(benchmark::State& state) {
  int const terms = int(state.range(0));
  std::vector<float> x(kN, 1.f), m0(kN, 0.5f), m1(kN, 0.25f), m2(kN, 0.125f);
  solver::step_coefficients k{0.9, {0.1, terms >= 2 ? -0.05 : 0.0, terms == 3 ? 0.01 : 0.0}, terms == 4 ? 0.2 : 0.0, 1};
  context<cpu> const ctx{};
  int step = 0;
  for (auto _ : state) {
    solver::update(ctx, k, x.data(), m0.data(), m1.data(), m2.data(), kN, solver::gaussian_noise{1}, ++step);
    benchmark::DoNotOptimize(x.data());
  }
  int const arrays = 2 + (terms >= 2 ? 1 : 0) + (terms == 3 ? 1 : 0);  // reads incl. x, plus the write
  state.counters["bytes"] = benchmark::Counter(double(kN) * sizeof(float) * (arrays + 1),
                                               benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_solver_update_cpu)->ArgNames({"terms"})->DenseRange(1, 4)->UseRealTime()->Unit(benchmark::kMillisecond);

// The ceiling: a copy of the state (read + write counted), split into the same 64K-value pieces
// and threads as the update, through Eigen (vectorised loads and stores).
void BM_copy_cpu(benchmark::State& state) {
  std::vector<float> a(kN, 1.f), b(kN);
  int const threads = detail::resolve_threads(0);
  std::int64_t const chunk = 1 << 16, pieces = std::int64_t(kN) / chunk;
  for (auto _ : state) {
    detail::parallel_for(threads, pieces, [&](std::int64_t p, int) {
      using arr = Eigen::Array<float, Eigen::Dynamic, 1>;
      Eigen::Map<arr>(b.data() + p * chunk, chunk) = Eigen::Map<arr const>(a.data() + p * chunk, chunk);
    });
    benchmark::DoNotOptimize(b.data());
  }
  state.counters["bytes"] = benchmark::Counter(2.0 * kN * sizeof(float), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_copy_cpu)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
