#pragma once
/// \file
/// The CUDA kernels of the anchor states (cuda/anchor.cuh launches them): the soft absorbing forward
/// process (the same counter-based numbers as the CPU), −½‖E_v‖² per table row, the per-token arg-max
/// of the rounding (one CUB block reduce per token), segment means and their broadcast, the bias add,
/// and the blend / re-anchoring behind anchor::guidance and anchor::keep_clean.

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/solver/noise.hpp>

#include <cub/block/block_reduce.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

template <class T>
__device__ __forceinline__ float anchor_to_f(T v) { return float(v); }
template <>
__device__ __forceinline__ float anchor_to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T anchor_from_d(double v) { return T(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 anchor_from_d<__nv_bfloat16>(double v) { return __float2bfloat16(float(v)); }

inline constexpr int anchor_absorb_group = 256;  ///< sequences per launch (their ᾱ travel as a kernel parameter)
struct anchor_absorb_params {
  double alpha_bar[anchor_absorb_group];
};

template <class T>
DRDIFF_KERNEL void anchor_absorb_kernel(anchor::soft_absorbing s, solver::gaussian_noise noise, T const* __restrict__ x0,
                              T const* __restrict__ m, unsigned char const* __restrict__ target, T* __restrict__ xt,
                              std::uint64_t stream, std::int64_t first_token, std::int64_t tokens, int seq, int dim,
                              int first_seq, anchor_absorb_params ab) {
  std::size_t const n = std::size_t(tokens) * dim;
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) {
    std::int64_t const tok = first_token + std::int64_t(j / dim);
    int const k = int(j % dim);
    std::size_t const i = std::size_t(tok) * dim + k;
    double const a = ab.alpha_bar[int(tok / seq) - first_seq];
    bool const tgt = target == nullptr || target[tok] != 0;
    bool const rep = tgt && anchor::detail::absorbed(s, stream, std::uint64_t(tok), a);
    double const eps = (tgt && !rep) ? noise(0, i) : 0.0;
    xt[i] = anchor_from_d<T>(
        anchor::detail::absorb_value(double(anchor_to_f(x0[i])), m ? double(anchor_to_f(m[k])) : 0.0, a, tgt, rep, eps));
  }
}

/// bias[v] = −½‖E_v‖² (l2) or 0 (dot): one warp per row.
template <class T>
DRDIFF_KERNEL void anchor_half_norm_kernel(T const* __restrict__ table, int vocab, int dim, bool l2, float* __restrict__ bias) {
  int const warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (warp >= vocab) return;
  float acc = 0.f;
  if (l2)
    for (int k = lane; k < dim; k += 32) {
      float const e = anchor_to_f(table[std::size_t(warp) * dim + k]);
      acc += e * e;
    }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) bias[warp] = -0.5f * acc;
}

struct anchor_best_pair {
  float score;
  int id;
};
struct anchor_best_op {
  __device__ __forceinline__ anchor_best_pair operator()(anchor_best_pair a, anchor_best_pair b) const {
    return (b.score > a.score || (b.score == a.score && b.id < a.id)) ? b : a;
  }
};

/// One block per token: arg-max of scores + bias (ties → smaller id); writes the id, the table row
/// into out (optional) and flags a non-finite best score.
template <class T, int Threads>
DRDIFF_KERNEL void __launch_bounds__(Threads)
    anchor_argmax_kernel(float const* __restrict__ scores, float const* __restrict__ bias, int vocab, int ld, int dim,
                         T const* __restrict__ table, std::int64_t first_token, int* __restrict__ ids,
                         T* __restrict__ out, int* __restrict__ bad) {
  using reduce = cub::BlockReduce<anchor_best_pair, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ int chosen;
  float const* row = scores + std::size_t(blockIdx.x) * ld;
  anchor_best_pair b{-INFINITY, 0x7fffffff};
  for (int v = threadIdx.x; v < vocab; v += Threads) {
    float const s = row[v] + bias[v];
    if (s > b.score) b = {s, v};  // a thread visits ids in ascending order: strict keeps the smaller
  }
  anchor_best_pair const r = reduce(tmp).Reduce(b, anchor_best_op{});
  std::int64_t const tok = first_token + blockIdx.x;
  if (threadIdx.x == 0) {
    chosen = r.id;
    ids[tok] = r.id;
    if (!isfinite(r.score) || r.id < 0 || r.id >= vocab) {
      atomicExch(bad, 1);
      chosen = 0;
    }
  }
  __syncthreads();
  if (out)
    for (int k = threadIdx.x; k < dim; k += Threads) out[std::size_t(tok) * dim + k] = table[std::size_t(chosen) * dim + k];
}

template <class T>
DRDIFF_KERNEL void anchor_segment_mean_kernel(T const* __restrict__ x, int batch, int seq, int dim, int length, int per_seq,
                                    T* __restrict__ means) {
  std::size_t const n = std::size_t(batch) * per_seq * dim;
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) {
    int const k = int(j % dim);
    std::size_t const seg = j / dim;
    int const b = int(seg / per_seq), g = int(seg % per_seq);
    int const i0 = g * length, i1 = min(seq, i0 + length);
    float acc = 0.f;
    for (int i = i0; i < i1; ++i) acc += anchor_to_f(x[(std::size_t(b) * seq + i) * dim + k]);
    means[j] = T(acc / float(i1 - i0));
  }
}

template <class T>
DRDIFF_KERNEL void anchor_segment_broadcast_kernel(T const* __restrict__ anchors, int batch, int seq, int dim, int length,
                                         int per_seq, T* __restrict__ out) {
  std::size_t const n = std::size_t(batch) * seq * dim;
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) {
    int const k = int(j % dim);
    std::size_t const tok = j / dim;
    int const b = int(tok / seq), i = int(tok % seq);
    out[j] = anchors[(std::size_t(b) * per_seq + i / length) * dim + k];
  }
}

template <class T>
DRDIFF_KERNEL void anchor_add_bias_kernel(T* __restrict__ out, T const* __restrict__ bias, std::size_t n, int dim) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) out[j] += bias[j % dim];
}

template <class T>
DRDIFF_KERNEL void anchor_blend_kernel(T* __restrict__ x0, T const* __restrict__ p, T g, std::size_t n) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) x0[j] += g * (p[j] - x0[j]);
}

template <class T>
DRDIFF_KERNEL void anchor_keep_kernel(T* __restrict__ x, T const* __restrict__ clean, unsigned char const* __restrict__ target,
                            std::size_t n, int dim) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride)
    if (target[j / dim] == 0) x[j] = clean[j];
}

}  // namespace detail
DRDIFF_NAMESPACE_END
