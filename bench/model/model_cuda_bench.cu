// End to end on the GPU (bf16, batch 1): the `base` preset (12 blocks, d_model 1024, 16 heads,
// 8 experts top-2 of FFN 2816) against the dense baseline of equal active parameters, at N = 4K, 16K,
// 64K. One denoiser forward (with the component split from a timed forward), and whole generations
// (DrDiff: 2M, 10 steps; dense: DDIM, 25 steps, measured up to 16K).

#include <drdiff/cuda.cuh>
#include <drdiff/cuda/model.cuh>

#include <benchmark/benchmark.h>

#include "../support/cuda_event_timer.cuh"
#include "model_configs.hpp"

#include <memory>

#include <thrust/device_vector.h>

using namespace drdiff;

namespace {

template <class Cfg>
model<drdiff::cuda, Cfg>& instance(Cfg const& cfg) {
  static std::unique_ptr<model<drdiff::cuda, Cfg>> m;
  if (!m) {
    model_weights w(cfg.sizes, cfg.activation);
    bench::fast_fill(w, 1);
    m = std::make_unique<model<drdiff::cuda, Cfg>>(cfg, w);
  }
  return *m;
}

template <class Cfg>
void forward(benchmark::State& state, Cfg const& cfg) {
  int const N = int(state.range(0));
  auto& m = instance(cfg);
  std::size_t const n = std::size_t(N) * cfg.sizes.embed_dim;
  thrust::device_vector<float> xs(n, 0.f), ys(n);
  float *x = thrust::raw_pointer_cast(xs.data()), *y = thrust::raw_pointer_cast(ys.data());
  model_timing split;
  m.forward(context<drdiff::cuda>{}, x, 0.5, y, 1, N);  // warm-up (allocations, cuBLAS heuristics)
  m.forward(context<drdiff::cuda>{}, x, 0.5, y, 1, N);
  for (int i = 0; i < 3; ++i) m.forward(context<drdiff::cuda>{}, x, 0.5, y, 1, N, &split);  // the component split, mean of 3
  bench::cuda_event_timer timer;
  for (auto _ : state) timer.time(state, 1, [&] { m.forward(context<drdiff::cuda>{}, x, 0.5, y, 1, N); });
  state.counters["tokens"] = benchmark::Counter(N, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["attention_ms"] = split.attention * 1e3 / 3;
  state.counters["moe_ms"] = split.moe * 1e3 / 3;
  state.counters["dense_ms"] = split.dense * 1e3 / 3;
}

template <class Cfg>
void generate(benchmark::State& state, Cfg const& cfg) {
  int const N = int(state.range(0));
  auto& m = instance(cfg);
  generation_request r;
  r.length = N;
  r.seed = 1;
  context<drdiff::cuda> const ctx{};
  m.generate(ctx, r);  // warm-up
  generation_result last;
  for (auto _ : state) {
    last = m.generate(ctx, r);
    state.SetIterationTime(last.seconds);
  }
  r.time_components = true;
  auto const split = m.generate(ctx, r).timing;
  state.counters["tokens"] = benchmark::Counter(N, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["steps"] = last.steps;
  state.counters["solver_ms"] = split.solver * 1e3;
  state.counters["rounding_ms"] = split.rounding * 1e3;
}

void BM_forward_drdiff_cuda(benchmark::State& s) { forward(s, bench::drdiff_config(presets::base())); }
void BM_forward_dense_cuda(benchmark::State& s) { forward(s, bench::dense_config(presets::base())); }
void BM_generate_drdiff_cuda(benchmark::State& s) { generate(s, bench::drdiff_config(presets::base())); }
void BM_generate_dense_cuda(benchmark::State& s) { generate(s, bench::dense_config(presets::base())); }

BENCHMARK(BM_forward_drdiff_cuda)->ArgName("N")->Arg(4096)->Arg(16384)->Arg(65536)->UseManualTime()->Iterations(5)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_forward_dense_cuda)->ArgName("N")->Arg(4096)->Arg(16384)->Arg(65536)->UseManualTime()->Iterations(3)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_generate_drdiff_cuda)->ArgName("N")->Arg(4096)->Arg(16384)->Arg(65536)->UseManualTime()->Iterations(2)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_generate_dense_cuda)->ArgName("N")->Arg(4096)->Arg(16384)->UseManualTime()->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
