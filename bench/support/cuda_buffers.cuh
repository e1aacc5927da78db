#pragma once
// Device buffers (owned by Thrust vectors) and deterministic fills for the CUDA benchmarks.

#include <drdiff/cuda/error.cuh>

#include <cuda_bf16.h>
#include <thrust/device_ptr.h>
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>
#include <thrust/tabulate.h>

#include <algorithm>
#include <cstddef>
#include <memory>
#include <vector>

namespace drdiff::bench {

/// scale·(u − ½) at index i, with u a hash of (i, seed) in [0, 1): no host transfer, the same every run.
template <class T>
struct uniform_hash {
  unsigned seed;
  float scale;
  __device__ T operator()(std::ptrdiff_t i) const {
    unsigned x = unsigned(i) * 2654435761u ^ seed;
    x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
    return T(scale * ((x & 0xffffff) / float(0x1000000) - 0.5f));
  }
};

/// Owns every allocation it hands out (each a Thrust device vector; the pointers stay valid for the
/// lifetime of the object).
struct buffers {
  std::vector<std::unique_ptr<thrust::device_vector<unsigned char>>> held;
  template <class T>
  T* alloc(std::size_t n) {
    held.push_back(std::make_unique<thrust::device_vector<unsigned char>>(std::max<std::size_t>(n, 1) * sizeof(T)));
    return reinterpret_cast<T*>(thrust::raw_pointer_cast(held.back()->data()));
  }
  /// An allocation filled with uniform_hash values.
  template <class T>
  T* random(std::size_t n, unsigned seed, float scale) {
    T* p = alloc<T>(n);
    auto const first = thrust::device_pointer_cast(p);
    thrust::tabulate(thrust::device, first, first + std::ptrdiff_t(n), uniform_hash<T>{seed, scale});
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    return p;
  }
};

}  // namespace drdiff::bench
