// Rounding to the nearest embedding on the CPU (anchor::round_to_nearest, float): 512 tokens against
// vocabularies of 32K and 50K at d = 128..1024, against the score GEMM alone (Eigen, the same token
// blocks on the same workers) measured in the same run.

#include <drdiff/cpu/anchor.hpp>

#include <benchmark/benchmark.h>

#include <random>
#include <vector>

using namespace drdiff;

namespace {

constexpr int kTokens = 512;

std::vector<float> randn(std::size_t n, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& e : v) e = nd(rng);
  return v;
}

void BM_round_cpu(benchmark::State& state) {
  int const V = int(state.range(0)), d = int(state.range(1));
  auto table = randn(std::size_t(V) * d, 1), x = randn(std::size_t(kTokens) * d, 2);
  std::vector<int> ids(kTokens);
  context<cpu> const ctx{};
  anchor::nearest_embedding<float> p{table.data(), V, d};
  anchor::token_shape const sh{1, kTokens, d};
  std::vector<char> ws(anchor::workspace_bytes(ctx, p, sh));
  for (auto _ : state) {
    anchor::round_to_nearest(ctx, p, sh, x.data(), ids.data(), static_cast<float*>(nullptr), ws.data(), ws.size());
    benchmark::DoNotOptimize(ids.data());
  }
  state.counters["tokens"] = benchmark::Counter(kTokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] = benchmark::Counter(2.0 * kTokens * V * d, benchmark::Counter::kIsIterationInvariantRate);
}

// The ceiling: the score GEMM alone (64-token blocks × the whole vocabulary, the same workers).
void BM_round_gemm_cpu(benchmark::State& state) {
  int const V = int(state.range(0)), d = int(state.range(1));
  auto table = randn(std::size_t(V) * d, 1), x = randn(std::size_t(kTokens) * d, 2);
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<mat const> E(table.data(), V, d);
  int const threads = drdiff::detail::resolve_threads(0);
  std::vector<mat> scores(threads, mat(64, V));
  for (auto _ : state) {
    drdiff::detail::parallel_for(threads, kTokens / 64, [&](std::int64_t c, int w) {
      Eigen::Map<mat const> X(x.data() + c * 64 * d, 64, d);
      scores[w].noalias() = X * E.transpose();
    });
    benchmark::DoNotOptimize(scores[0].data());
  }
  state.counters["tokens"] = benchmark::Counter(kTokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] = benchmark::Counter(2.0 * kTokens * V * d, benchmark::Counter::kIsIterationInvariantRate);
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"V", "d"});
  for (int V : {32000, 50257})
    for (int d : {128, 256, 512, 1024}) b->Args({V, d});
  b->Unit(benchmark::kMillisecond)->MinTime(0.5)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_round_cpu)->Apply(shapes);
BENCHMARK(BM_round_gemm_cpu)->Apply(shapes);

BENCHMARK_MAIN();
