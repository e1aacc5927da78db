// End to end on the CPU (fp32, batch 1): the `small` preset (4 blocks, d_model 256, 4 heads,
// 8 experts top-2 of FFN 512) against the dense baseline of equal active parameters (dense attention,
// one FFN of 1024, DDIM in 25 steps), at N = 1K and 4K: one denoiser forward with its component split,
// and whole generations (DrDiff: 2M, 10 steps).

#include <drdiff/cpu/model.hpp>

#include <benchmark/benchmark.h>

#include "model_configs.hpp"

#include <memory>

using namespace drdiff;

namespace {

template <class Cfg>
model<cpu, Cfg>& instance(Cfg const& cfg) {
  static std::unique_ptr<model<cpu, Cfg>> m;
  if (!m) {
    m = std::make_unique<model<cpu, Cfg>>(cfg);
    bench::fast_fill(m->weights(), 1);
  }
  return *m;
}

template <class Cfg>
void forward(benchmark::State& state, Cfg const& cfg) {
  int const N = int(state.range(0));
  auto& m = instance(cfg);
  std::vector<float> x(std::size_t(N) * cfg.sizes.embed_dim, 0.1f), y(x.size());
  context<cpu> const ctx{};
  model_timing split;
  m.forward(ctx, x.data(), 0.5, y.data(), 1, N, &split);
  for (auto _ : state) m.forward(ctx, x.data(), 0.5, y.data(), 1, N);
  state.counters["tokens"] = benchmark::Counter(N, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["attention_ms"] = split.attention * 1e3;
  state.counters["moe_ms"] = split.moe * 1e3;
  state.counters["dense_ms"] = split.dense * 1e3;
}

template <class Cfg>
void generate(benchmark::State& state, Cfg const& cfg) {
  int const N = int(state.range(0));
  auto& m = instance(cfg);
  generation_request r;
  r.length = N;
  r.seed = 1;
  generation_result last;
  for (auto _ : state) last = m.generate(context<cpu>{}, r);
  state.counters["tokens"] = benchmark::Counter(N, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["steps"] = last.steps;
  state.counters["solver_ms"] = last.timing.solver * 1e3;
  state.counters["rounding_ms"] = last.timing.rounding * 1e3;
}

void BM_forward_drdiff_cpu(benchmark::State& s) { forward(s, bench::drdiff_config(presets::small())); }
void BM_forward_dense_cpu(benchmark::State& s) { forward(s, bench::dense_config(presets::small())); }
void BM_generate_drdiff_cpu(benchmark::State& s) { generate(s, bench::drdiff_config(presets::small())); }
void BM_generate_dense_cpu(benchmark::State& s) { generate(s, bench::dense_config(presets::small())); }

BENCHMARK(BM_forward_drdiff_cpu)->ArgName("N")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
BENCHMARK(BM_forward_dense_cpu)->ArgName("N")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(1.0);
BENCHMARK(BM_generate_drdiff_cpu)->ArgName("N")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(2);
BENCHMARK(BM_generate_dense_cpu)->ArgName("N")->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(1);

}  // namespace

BENCHMARK_MAIN();
