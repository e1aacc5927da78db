#pragma once
// Timing GPU work for Google Benchmark: CUDA events around the launches, reported with
// state.SetIterationTime (use ->UseManualTime()).

#include <drdiff/cuda/error.cuh>

#include <benchmark/benchmark.h>

namespace drdiff::bench {

class cuda_event_timer {
 public:
  cuda_event_timer() {
    DRDIFF_CUDA_CHECK(cudaEventCreate(&start_));
    DRDIFF_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~cuda_event_timer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  /// Times `reps` calls of f() and records the mean per call as the iteration time.
  template <class F>
  void time(benchmark::State& state, int reps, F&& f) {
    DRDIFF_CUDA_CHECK(cudaEventRecord(start_));
    for (int r = 0; r < reps; ++r) f();
    DRDIFF_CUDA_CHECK(cudaEventRecord(stop_));
    DRDIFF_CUDA_CHECK(cudaEventSynchronize(stop_));
    float ms = 0;
    DRDIFF_CUDA_CHECK(cudaEventElapsedTime(&ms, start_, stop_));
    state.SetIterationTime(ms * 1e-3 / reps);
  }

 private:
  cudaEvent_t start_{}, stop_{};
};

}  // namespace drdiff::bench
