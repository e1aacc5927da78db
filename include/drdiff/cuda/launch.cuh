#pragma once
/// \file
/// Launch helpers of the CUDA backend: the device's SM count (asked once per device) and the grid of
/// a grid-stride loop.

#include <drdiff/cuda/error.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Streaming multiprocessors of `device` (-1: the current one). Cached per device: one attribute
/// query per device and process, safe from several threads.
inline int sm_count(int device = -1) {
  if (device < 0) DRDIFF_CUDA_CHECK(cudaGetDevice(&device));
  constexpr int cached = 64;
  static std::atomic<int> count[cached] = {};
  if (device < cached) {
    int const c = count[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device < cached) count[device].store(n, std::memory_order_relaxed);
  return n;
}

/// Blocks of `threads` for a grid-stride loop over n elements: enough to cover n, at most `per_sm`
/// blocks per SM of the current device (more would only queue; the loop takes the rest).
inline unsigned stride_grid(std::size_t n, int threads, int per_sm) {
  std::size_t const cover = (n + std::size_t(threads) - 1) / std::size_t(threads);
  return unsigned(std::max<std::size_t>(1, std::min<std::size_t>(cover, std::size_t(sm_count()) * per_sm)));
}

}  // namespace detail
DRDIFF_NAMESPACE_END
