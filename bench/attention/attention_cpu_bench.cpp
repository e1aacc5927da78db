// CPU attention benchmarks: every pattern at N = 1K..64K, the backward of dense, local and hsa, the
// float64 reference, and the Eigen GEMM ceiling measured in the same binary.
//
// Counters: `flops` = useful FLOP/s (4·D·allowed pairs per second; the backward 10·D: S again, dP,
// dV, dQ and dK), `per_query` = seconds per (query row, head), `density` = allowed pairs / N².
// Wall-clock time (the kernels use every core).

#include <benchmark/benchmark.h>

#include <Eigen/Core>

#include <climits>
#include <vector>

#include "../support/bench_problem.hpp"

using namespace drdiff;

namespace {

constexpr int kHeads = 4, kDim = 64;

template <class Policy>
void run_attention(benchmark::State& state, Policy const& policy) {
  int const n = int(state.range(0));
  bench::problem<float> p(1, n, kHeads, kDim);
  context<cpu> const ctx{};
  std::vector<unsigned char> ws(attention_workspace_bytes(ctx, policy, p.args));
  attention(ctx, policy, p.args, ws.data(), ws.size());  // warm-up
  for (auto _ : state) {
    attention(ctx, policy, p.args, ws.data(), ws.size());
    benchmark::DoNotOptimize(p.o.data());
    benchmark::ClobberMemory();
  }
  double const flops = bench::useful_flops(policy, 1, n, kHeads, kDim);
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["per_query"] = benchmark::Counter(double(n) * kHeads, benchmark::Counter::kIsIterationInvariantRate |
                                                                           benchmark::Counter::kInvert);
  state.counters["density"] = flops / (4.0 * kDim * kHeads * double(n) * n);
  state.counters["threads"] = detail::resolve_threads(ctx.num_threads);
}

// The patterns of the HSA paper at the sizes of its default 16K tier, one at a time and together.
void BM_attention_dense_cpu(benchmark::State& s) { run_attention(s, attn::dense{}); }
void BM_attention_local_cpu(benchmark::State& s) { run_attention(s, attn::local_window{256}); }
void BM_attention_dilated_cpu(benchmark::State& s) { run_attention(s, attn::dilated{4, 2048}); }
void BM_attention_global_cpu(benchmark::State& s) { run_attention(s, attn::global_tokens::first(64)); }
void BM_attention_union_cpu(benchmark::State& s) {
  run_attention(s, attn::local_window{256} | attn::dilated{4, 2048} | attn::global_tokens::first(64));
}
void BM_attention_hsa_cpu(benchmark::State& s) { run_attention(s, attn::hsa{}); }

void sizes(benchmark::internal::Benchmark* b, int max_n) {
  b->ArgNames({"seq"})->UseRealTime()->Unit(benchmark::kMillisecond);
  for (int n = 1024; n <= max_n; n *= 2) b->Arg(n);
}

/// attention_backward (from the forward's o and lse, a random dO).
template <class Policy>
void run_backward(benchmark::State& state, Policy const& policy) {
  int const n = int(state.range(0));
  bench::problem<float> p(1, n, kHeads, kDim);
  context<cpu> const ctx{};
  attention(ctx, policy, p.args);
  std::vector<float> g(p.q.size(), 0.5f), dq(p.q.size()), dk(p.q.size()), dv(p.q.size());
  auto const a = make_attention_backward_args(p.args, g.data(), dq.data(), dk.data(), dv.data());
  std::vector<unsigned char> ws(attention_backward_workspace_bytes(ctx, policy, a));
  attention_backward(ctx, policy, a, ws.data(), ws.size());  // warm-up
  for (auto _ : state) {
    attention_backward(ctx, policy, a, ws.data(), ws.size());
    benchmark::DoNotOptimize(dq.data());
    benchmark::ClobberMemory();
  }
  double const flops = 2.5 * bench::useful_flops(policy, 1, n, kHeads, kDim);
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["per_query"] = benchmark::Counter(double(n) * kHeads, benchmark::Counter::kIsIterationInvariantRate |
                                                                           benchmark::Counter::kInvert);
  state.counters["threads"] = detail::resolve_threads(ctx.num_threads);
}
void BM_attention_backward_dense_cpu(benchmark::State& s) { run_backward(s, attn::dense{}); }
void BM_attention_backward_local_cpu(benchmark::State& s) { run_backward(s, attn::local_window{256}); }
void BM_attention_backward_hsa_cpu(benchmark::State& s) { run_backward(s, attn::hsa{}); }

BENCHMARK(BM_attention_dense_cpu)->Apply([](auto* b) { sizes(b, 16384); });
BENCHMARK(BM_attention_local_cpu)->Apply([](auto* b) { sizes(b, 65536); });
BENCHMARK(BM_attention_dilated_cpu)->Apply([](auto* b) { sizes(b, 65536); });
BENCHMARK(BM_attention_global_cpu)->Apply([](auto* b) { sizes(b, 65536); });
BENCHMARK(BM_attention_union_cpu)->Apply([](auto* b) { sizes(b, 65536); });
BENCHMARK(BM_attention_hsa_cpu)->Apply([](auto* b) { sizes(b, 65536); });
BENCHMARK(BM_attention_backward_dense_cpu)->Apply([](auto* b) { sizes(b, 8192); });
BENCHMARK(BM_attention_backward_local_cpu)->Apply([](auto* b) { sizes(b, 65536); });
BENCHMARK(BM_attention_backward_hsa_cpu)->Apply([](auto* b) { sizes(b, 65536); });

// The float64 oracle on the HSA pattern (O(N²) mask tests, by design).
void BM_attention_reference_hsa_cpu(benchmark::State& state) {
  int const n = int(state.range(0));
  bench::problem<float> p(1, n, kHeads, kDim);
  attn::hsa const h{};
  for (auto _ : state) {
    attention_reference(h, p.args);
    benchmark::DoNotOptimize(p.o.data());
  }
  double const flops = bench::useful_flops(h, 1, n, kHeads, kDim);
  state.counters["flops"] = benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["per_query"] = benchmark::Counter(double(n) * kHeads, benchmark::Counter::kIsIterationInvariantRate |
                                                                           benchmark::Counter::kInvert);
}
BENCHMARK(BM_attention_reference_hsa_cpu)->ArgNames({"seq"})->Arg(4096)->Arg(16384)->UseRealTime()
    ->Unit(benchmark::kMillisecond)->Iterations(1);

// The ceiling: float GEMMs through Eigen, one independent product per worker thread (the same
// threading the attention kernel uses). `m` = 1024: a large square product; `m` = 64: the tile
// shape of the kernel, (64×64)·(64×128).
void BM_eigen_gemm_cpu(benchmark::State& state) {
  int const m = int(state.range(0));
  int const k = m == 64 ? 64 : m, n = m == 64 ? 128 : m;
  int const threads = detail::resolve_threads(0);
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::vector<mat> a(threads, mat::Random(m, k)), b(threads, mat::Random(k, n)), c(threads, mat::Zero(m, n));
  long const reps = m == 64 ? 2000 : 4;
  for (auto _ : state) {
    detail::parallel_for(threads, threads, [&](std::int64_t t, int) {
      for (long r = 0; r < reps; ++r) c[t].noalias() += a[t] * b[t];
    });
    benchmark::DoNotOptimize(c[0].data());
  }
  state.counters["flops"] = benchmark::Counter(2.0 * m * k * n * reps * threads,
                                               benchmark::Counter::kIsIterationInvariantRate);
  state.counters["threads"] = threads;
}
BENCHMARK(BM_eigen_gemm_cpu)->ArgNames({"m"})->Arg(1024)->Arg(64)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
