// The fused solver update on the GPU (one kernel): bytes moved per second against a device-to-device
// copy of the same state in the same run. 16M fp32 values; terms: 1 = DDIM, 2 = 2M, 3 = 3M, 4 = SDE-2M.

#include <drdiff/cuda.cuh>

#include <benchmark/benchmark.h>

#include <thrust/device_vector.h>

#include "../support/cuda_event_timer.cuh"

using namespace drdiff;

namespace {

constexpr std::size_t kN = std::size_t(1) << 24;

struct state_buffers {
  float *x = nullptr, *m0 = nullptr, *m1 = nullptr, *m2 = nullptr;
  thrust::device_vector<float> held[4];
  state_buffers() {
    float** p[] = {&x, &m0, &m1, &m2};
    for (int i = 0; i < 4; ++i) {
      held[i].assign(kN, 0.f);
      *p[i] = thrust::raw_pointer_cast(held[i].data());
    }
  }
};

void BM_solver_update_cuda(benchmark::State& state) {
  int const terms = int(state.range(0));
  state_buffers b;
  solver::step_coefficients k{0.9, {0.1, terms >= 2 ? -0.05 : 0.0, terms == 3 ? 0.01 : 0.0}, terms == 4 ? 0.2 : 0.0, 1};
  context<drdiff::cuda> const ctx{};
  solver::update(ctx, k, b.x, b.m0, b.m1, b.m2, kN, solver::gaussian_noise{1}, 0);
  bench::cuda_event_timer timer;
  int step = 0;
  for (auto _ : state)
    timer.time(state, 20, [&] { solver::update(ctx, k, b.x, b.m0, b.m1, b.m2, kN, solver::gaussian_noise{1}, ++step); });
  int const arrays = 2 + (terms >= 2 ? 1 : 0) + (terms == 3 ? 1 : 0);
  state.counters["bytes"] = benchmark::Counter(double(kN) * sizeof(float) * (arrays + 1),
                                               benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_solver_update_cuda)->ArgNames({"terms"})->DenseRange(1, 4)->UseManualTime()->Unit(benchmark::kMillisecond);

void BM_copy_cuda(benchmark::State& state) {
  state_buffers b;
  bench::cuda_event_timer timer;
  for (auto _ : state)
    timer.time(state, 20, [&] { DRDIFF_CUDA_CHECK(cudaMemcpyAsync(b.m0, b.x, kN * sizeof(float), cudaMemcpyDeviceToDevice)); });
  state.counters["bytes"] = benchmark::Counter(2.0 * kN * sizeof(float), benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_copy_cuda)->UseManualTime()->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
