#pragma once
// Device buffers and deterministic fills for the CUDA benchmarks.

#include <drdiff/cuda/error.cuh>

#include <cuda_bf16.h>

#include <algorithm>
#include <cstddef>
#include <vector>

namespace drdiff::bench {

/// p[i] = scale·(u − ½) with u a hash of (i, seed) in [0, 1): no host transfer, the same every run.
template <class T>
__global__ void fill_uniform(T* p, std::size_t n, unsigned seed, float scale) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    unsigned x = unsigned(i) * 2654435761u ^ seed;
    x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
    p[i] = T(scale * ((x & 0xffffff) / float(0x1000000) - 0.5f));
  }
}

/// Owns every allocation it hands out.
struct buffers {
  std::vector<void*> ptrs;
  template <class T>
  T* alloc(std::size_t n) {
    void* p = nullptr;
    DRDIFF_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(n, 1) * sizeof(T)));
    ptrs.push_back(p);
    return static_cast<T*>(p);
  }
  /// An allocation filled by fill_uniform.
  template <class T>
  T* random(std::size_t n, unsigned seed, float scale) {
    T* p = alloc<T>(n);
    fill_uniform<<<2048, 256>>>(p, n, seed, scale);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    return p;
  }
  ~buffers() {
    for (void* p : ptrs) cudaFree(p);
  }
};

}  // namespace drdiff::bench
