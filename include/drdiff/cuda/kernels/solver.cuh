#pragma once
/// \file
/// The CUDA kernels of the solvers (cuda/solver.cuh launches them): the fused state update
/// x ← a·x + b0·m0 + b1·m1 + b2·m2 + c·z with the counter-based noise drawn in the kernel, and the
/// finiteness flag of the sampling loop.

#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/solver/noise.hpp>

#include <cuda_runtime.h>

#include <cstddef>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

template <class T, bool Use1, bool Use2, bool Noise>
DRDIFF_KERNEL void solver_update_kernel(T* __restrict__ x, T const* __restrict__ m0, T const* __restrict__ m1,
                                     T const* __restrict__ m2, std::size_t n, T a, T b0, T b1, T b2, T c,
                                     solver::gaussian_noise noise, int step) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += stride) {
    T v = a * x[i] + b0 * m0[i];
    if constexpr (Use1) v += b1 * m1[i];
    if constexpr (Use2) v += b2 * m2[i];
    if constexpr (Noise) v += c * T(noise(step, i));
    x[i] = v;
  }
}

template <class T>
DRDIFF_KERNEL void solver_finite_kernel(T const* __restrict__ v, std::size_t n, int step, int* __restrict__ first_bad) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += stride)
    if (!isfinite(v[i])) {
      atomicMin(first_bad, step);
      return;
    }
}

}  // namespace detail
DRDIFF_NAMESPACE_END
