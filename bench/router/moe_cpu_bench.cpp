// The routed MoE FFN on the CPU: tokens per second for E = 8, 16, 64 experts with top-1, top-2 and
// adaptive (entropy, 1..4) routing, against a dense FFN with the same active parameters (d_ff·k).
// T = 2048 tokens, d_model = 256, d_ff = 1024 (a CPU-sized slice of the GPU targets' shapes), GELU.

#include <drdiff/cpu/moe.hpp>

#include <benchmark/benchmark.h>

#include <random>
#include <vector>

using namespace drdiff;
using namespace drdiff::router;

namespace {

constexpr int kT = 2048, kD = 256, kF = 1024;

struct weights {
  std::vector<float> x, wr, up, down, out;
  explicit weights(int E, int f = kF) {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    auto fill = [&](std::vector<float>& v, std::size_t n, float s) {
      v.resize(n);
      for (auto& e : v) e = s * nd(rng);
    };
    fill(x, std::size_t(kT) * kD, 1.f);
    fill(wr, std::size_t(E) * kD, 1.f / 16.f);
    fill(up, std::size_t(E) * f * kD, 1.f / 16.f);
    fill(down, std::size_t(E) * kD * f, 1.f / 32.f);
    out.resize(std::size_t(kT) * kD);
  }
  moe_args<float> args(int E, int f = kF) {
    moe_args<float> a;
    a.tokens = kT; a.d_model = kD; a.d_ff = f; a.experts = E;
    a.x = x.data(); a.w_router = wr.data(); a.w_up = up.data(); a.w_down = down.data(); a.out = out.data();
    return a;
  }
};

template <class R>
void run(benchmark::State& state, R const& r, int E) {
  weights w(E);
  auto a = w.args(E);
  moe_stats st;
  context<cpu> const ctx{};
  a.maybe_stats = &st;
  moe_forward(ctx, r, a);
  a.maybe_stats = nullptr;  // (the timed calls skip the statistics)
  for (auto _ : state) {
    moe_forward(ctx, r, a);
    benchmark::DoNotOptimize(w.out.data());
  }
  state.counters["tokens"] = benchmark::Counter(kT, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["active"] = st.mean_active;
  state.counters["flops"] = benchmark::Counter(4.0 * kD * kF * st.mean_active * kT,
                                               benchmark::Counter::kIsIterationInvariantRate);
}

void BM_moe_top1_cpu(benchmark::State& s) { run(s, top_k{1, true}, int(s.range(0))); }
void BM_moe_top2_cpu(benchmark::State& s) { run(s, top_k{2, true}, int(s.range(0))); }
void BM_moe_adaptive_cpu(benchmark::State& s) { run(s, adaptive<entropy_score>{1, 4}, int(s.range(0))); }
BENCHMARK(BM_moe_top1_cpu)->ArgNames({"E"})->Arg(8)->Arg(16)->Arg(64)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_moe_top2_cpu)->ArgNames({"E"})->Arg(8)->Arg(16)->Arg(64)->UseRealTime()->Unit(benchmark::kMillisecond);
BENCHMARK(BM_moe_adaptive_cpu)->ArgNames({"E"})->Arg(8)->Arg(16)->Arg(64)->UseRealTime()->Unit(benchmark::kMillisecond);

// The dense baseline with the same active parameters: one expert of width k·d_ff, every token.
void BM_dense_ffn_cpu(benchmark::State& state) {
  int const k = int(state.range(0));
  weights w(1, k * kF);
  auto a = w.args(1, k * kF);
  context<cpu> const ctx{};
  for (auto _ : state) {
    moe_forward(ctx, top_k{1, true}, a);
    benchmark::DoNotOptimize(w.out.data());
  }
  state.counters["tokens"] = benchmark::Counter(kT, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] = benchmark::Counter(4.0 * kD * kF * k * kT, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_dense_ffn_cpu)->ArgNames({"k"})->Arg(1)->Arg(2)->UseRealTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
