#pragma once
/// \file
/// CUDA side of the solvers: the fused state update x ← a·x + b0·m0 + b1·m1 + b2·m2 + c·z in one
/// kernel (state in fp32 or fp64; data predictions in the same type), with the counter-based noise
/// drawn in the kernel, so CPU and GPU compute the same numbers.

#include <drdiff/core/backend.hpp>
#include <drdiff/cuda/error.cuh>
#include <drdiff/solver/dpmpp.hpp>
#include <drdiff/solver/noise.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

template <class T, bool Use1, bool Use2, bool Noise>
__global__ void solver_update_kernel(T* __restrict__ x, T const* __restrict__ m0, T const* __restrict__ m1,
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

}  // namespace detail

namespace solver {

/// The CUDA counterpart of update(context<cpu>, ...): device pointers, launched on ctx.stream.
template <class T>
void update(context<cuda> const& ctx, step_coefficients const& k, T* x, T const* m0, T const* m1, T const* m2,
            std::size_t n, gaussian_noise const& noise = {}, int step = 0) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "drdiff::solver::update: the solver state is fp32 or fp64 (keep it fp32 when the model runs bf16).");
  if (n == 0) return;
  auto const stream = reinterpret_cast<cudaStream_t>(ctx.stream);
  int const threads = 256;
  unsigned const blocks = unsigned(std::min<std::size_t>((n + threads - 1) / threads, 132 * 16));
  bool const u1 = k.b[1] != 0, u2 = k.b[2] != 0, z = k.c != 0;
  T const a = T(k.a), b0 = T(k.b[0]), b1 = T(k.b[1]), b2 = T(k.b[2]), c = T(k.c);
  auto launch = [&](auto use1, auto use2, auto use_noise) {
    detail::solver_update_kernel<T, decltype(use1)::value, decltype(use2)::value, decltype(use_noise)::value>
        <<<blocks, threads, 0, stream>>>(x, m0, m1, m2, n, a, b0, b1, b2, c, noise, step);
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (z) {
    if (u1 && u2) launch(yes{}, yes{}, yes{});
    else if (u1) launch(yes{}, no{}, yes{});
    else if (u2) launch(no{}, yes{}, yes{});
    else launch(no{}, no{}, yes{});
  } else {
    if (u1 && u2) launch(yes{}, yes{}, no{});
    else if (u1) launch(yes{}, no{}, no{});
    else if (u2) launch(no{}, yes{}, no{});
    else launch(no{}, no{}, no{});
  }
  DRDIFF_CUDA_CHECK(cudaGetLastError());
}

}  // namespace solver
DRDIFF_NAMESPACE_END
