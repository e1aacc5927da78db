#pragma once
/// \file
/// The CUDA kernels of the routed MoE (cuda/moe.cuh launches them): the router functor per token
/// (one thread each, with the batch statistics when asked), expert choice's softmax, marks and lists,
/// the expert histogram, the slot inversion, the row gather, the expert activation and the combine
/// in each token's selection order (scalar and 16-byte vector forms).

#include <drdiff/core/config.hpp>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/router/routers.hpp>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// stat (optional, 2E + 2 doubles): Σ_t p_t[e], argmax counts, Σ lse², Σ selections.
template <class Router>
DRDIFF_KERNEL void moe_route_kernel(Router r, float const* logits, float const* bias, int tokens, int experts, int width,
                                 float timestep, float const* scores, int* count, int* expert, float* weight,
                                 unsigned* keys,
                                 unsigned* entries, int* bad, double* stat) {
  int const t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  float z[router::max_experts];
  for (int e = 0; e < experts; ++e) {
    z[e] = logits[std::size_t(t) * experts + e] + (bias ? bias[e] : 0.f);
    if (!isfinite(z[e])) atomicExch(bad, 1);
  }
  router::token_info info;
  info.token = t;
  info.timestep = timestep;
  info.score = scores ? scores[t] : 0.f;
  int const n = r(z, experts, info, expert + std::size_t(t) * width, weight + std::size_t(t) * width);
  count[t] = n;
  if (stat) {  // the statistics, as the CPU computes them (atomics: only when asked for)
    float p[router::max_experts];
    float const lse = router::detail::softmax(z, experts, p);
    int best = 0;
    for (int e = 0; e < experts; ++e) {
      atomicAdd(stat + e, double(p[e]));
      best = p[e] > p[best] ? e : best;
    }
    atomicAdd(stat + experts + best, 1.0);
    atomicAdd(stat + 2 * experts, double(lse) * double(lse));
    atomicAdd(stat + 2 * experts + 1, double(n));
  }
  for (int j = 0; j < width; ++j) {
    std::size_t const entry = std::size_t(t) * width + j;
    keys[entry] = j < n ? unsigned(expert[entry]) : unsigned(experts);  // unused slots sort last
    entries[entry] = unsigned(entry);
  }
}

template <class T>
DRDIFF_KERNEL void moe_gather_kernel(T const* x, unsigned const* sorted_entries, int const* row_pos, int rows, int width,
                                  int d, T* xs) {
  int const r = blockIdx.x;
  if (r >= rows || row_pos[r] < 0) return;
  std::size_t const token = sorted_entries[r] / unsigned(width);
  for (int k = threadIdx.x; k < d; k += blockDim.x) xs[std::size_t(row_pos[r]) * d + k] = x[token * d + k];
}

/// The expert activation in fp32: GELU (erf) of u, or silu(g)·u for SwiGLU.
__device__ __forceinline__ float moe_act(float u, float g, int swiglu) {
  return swiglu ? u * g / (1.f + expf(-g)) : 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
}

/// In place: h ← act(h) (GELU) or silu(g)·h (SwiGLU), computed in fp32, stored in T.
template <class T>
DRDIFF_KERNEL void moe_activation_kernel(T* h, T const* g, std::size_t n, int swiglu) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    h[i] = T(moe_act(float(h[i]), swiglu ? float(g[i]) : 0.f, swiglu));
}

template <class T>
DRDIFF_KERNEL void moe_combine_kernel(T const* y, int const* count, float const* weight, int width, int d, int tokens,
                                   int const* slot_of, T const* shared, T* out, float* residual) {
  int const t = blockIdx.x;
  if (t >= tokens) return;
  for (int k = threadIdx.x; k < d; k += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < count[t]; ++j) {
      std::size_t const entry = std::size_t(t) * width + j;
      int const slot = slot_of[entry];
      if (slot >= 0) acc += weight[entry] * float(y[std::size_t(slot) * d + k]);
    }
    if (shared) acc += float(shared[std::size_t(t) * d + k]);
    if (residual) residual[std::size_t(t) * d + k] += acc;
    else out[std::size_t(t) * d + k] = T(acc);
  }
}

/// 16-byte vector forms of the gather, activation and combine (rows a multiple of 16 bytes, aligned
/// pointers): one uint4 per thread and step instead of one element.
template <class T>
inline constexpr int moe_vec = int(16 / sizeof(T));

template <class T>
DRDIFF_KERNEL void moe_gather_vec_kernel(T const* x, unsigned const* sorted_entries, int const* row_pos, int rows,
                                      int width, int d, T* xs) {
  int const r = blockIdx.x;
  if (r >= rows || row_pos[r] < 0) return;
  std::size_t const token = sorted_entries[r] / unsigned(width);
  int const chunks = d / moe_vec<T>;
  uint4 const* src = reinterpret_cast<uint4 const*>(x + token * d);
  uint4* dst = reinterpret_cast<uint4*>(xs + std::size_t(row_pos[r]) * d);
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) dst[c] = src[c];
}

template <class T>
DRDIFF_KERNEL void moe_activation_vec_kernel(T* h, T const* g, std::size_t chunks, int swiglu) {
  constexpr int V = moe_vec<T>;
  for (std::size_t c = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; c < chunks;
       c += std::size_t(gridDim.x) * blockDim.x) {
    uint4 hv = reinterpret_cast<uint4*>(h)[c], gv{};
    if (swiglu) gv = reinterpret_cast<uint4 const*>(g)[c];
    T* he = reinterpret_cast<T*>(&hv);
    T const* ge = reinterpret_cast<T const*>(&gv);
#pragma unroll
    for (int k = 0; k < V; ++k) he[k] = T(moe_act(float(he[k]), swiglu ? float(ge[k]) : 0.f, swiglu));
    reinterpret_cast<uint4*>(h)[c] = hv;
  }
}

template <class T>
DRDIFF_KERNEL void moe_combine_vec_kernel(T const* y, int const* count, float const* weight, int width, int d, int tokens,
                                       int const* slot_of, T const* shared, T* out, float* residual) {
  constexpr int V = moe_vec<T>;
  int const t = blockIdx.x;
  if (t >= tokens) return;
  int const chunks = d / V, n = count[t];
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float acc[V] = {};
    for (int j = 0; j < n; ++j) {  // each token's selection order: the same sum on every run
      std::size_t const entry = std::size_t(t) * width + j;
      int const slot = slot_of[entry];
      if (slot < 0) continue;  // dropped by the capacity limit
      uint4 const v = reinterpret_cast<uint4 const*>(y + std::size_t(slot) * d)[c];
      T const* e = reinterpret_cast<T const*>(&v);
      float const w = weight[entry];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += w * float(e[k]);
    }
    if (shared) {  // the shared experts' sum, added last (as on the CPU)
      uint4 const v = reinterpret_cast<uint4 const*>(shared + std::size_t(t) * d)[c];
      T const* e = reinterpret_cast<T const*>(&v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += float(e[k]);
    }
    if (residual) {  // V fp32 values: V / 4 float4 (16-byte aligned: d is a multiple of V)
      float4* const rp = reinterpret_cast<float4*>(residual + std::size_t(t) * d + std::size_t(c) * V);
#pragma unroll
      for (int k = 0; k < V / 4; ++k) {
        float4 r = rp[k];
        r.x += acc[4 * k]; r.y += acc[4 * k + 1]; r.z += acc[4 * k + 2]; r.w += acc[4 * k + 3];
        rp[k] = r;
      }
      continue;
    }
    uint4 o;
    T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int k = 0; k < V; ++k) oe[k] = T(acc[k]);
    reinterpret_cast<uint4*>(out + std::size_t(t) * d)[c] = o;
  }
}

// ---- expert choice: each expert's top-c tokens, then the same per-token lists as token choice ----

/// Softmax per token (fp32) in place in `prob` [T × E] and transposed into probT [E × T]; token ids.
DRDIFF_KERNEL void moe_ec_softmax_kernel(float* prob, float const* bias, int tokens, int experts, float* probT,
                                             int* ids, int* bad) {
  int const t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  float z[router::max_experts], p[router::max_experts];
  for (int e = 0; e < experts; ++e) {
    z[e] = prob[std::size_t(t) * experts + e] + (bias ? bias[e] : 0.f);
    if (!isfinite(z[e])) atomicExch(bad, 1);
  }
  router::detail::softmax(z, experts, p);
  for (int e = 0; e < experts; ++e) {
    prob[std::size_t(t) * experts + e] = p[e];
    probT[std::size_t(e) * tokens + t] = p[e];
    ids[std::size_t(e) * tokens + t] = t;
  }
}
DRDIFF_KERNEL void moe_ec_segments_kernel(int* seg, int experts, int tokens) {
  int const e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e <= experts) seg[e] = e * tokens;
}
/// chosen[t·E + e] = 1 for the first c tokens of each expert's descending order.
DRDIFF_KERNEL void moe_ec_mark_kernel(int const* sorted_ids, int tokens, int experts, int c, unsigned char* chosen) {
  std::size_t const i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i >= std::size_t(experts) * c) return;
  int const e = int(i / c), k = int(i % c);
  chosen[std::size_t(sorted_ids[std::size_t(e) * tokens + k]) * experts + e] = 1;
}
/// Each token's experts in increasing index, weighted by their probabilities (the CPU's order).
DRDIFF_KERNEL void moe_ec_lists_kernel(unsigned char const* chosen, float const* prob, int tokens, int experts,
                                           int* count, int* expert, float* weight, unsigned* keys, unsigned* entries) {
  int const t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  int n = 0;
  for (int e = 0; e < experts; ++e)
    if (chosen[std::size_t(t) * experts + e]) {
      std::size_t const entry = std::size_t(t) * experts + n++;
      expert[entry] = e;
      weight[entry] = prob[std::size_t(t) * experts + e];
    }
  count[t] = n;
  for (int j = 0; j < experts; ++j) {
    std::size_t const entry = std::size_t(t) * experts + j;
    keys[entry] = j < n ? unsigned(expert[entry]) : unsigned(experts);
    entries[entry] = unsigned(entry);
  }
}

/// counts[e] = number of selections of expert e (integer atomics: the counts are exact). Each block
/// counts in shared memory and adds its nonzero bins once (global atomics on E counters from every
/// thread serialise: 26 µs for 32K keys on the H100, against a few µs this way).
DRDIFF_KERNEL void moe_histogram_kernel(unsigned const* keys, std::size_t n, int experts, int* counts) {
  __shared__ int bins[router::max_experts];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) bins[e] = 0;
  __syncthreads();
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    if (keys[i] < unsigned(experts)) atomicAdd(bins + keys[i], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x)
    if (bins[e] != 0) atomicAdd(counts + e, bins[e]);
}

/// The row of each selection in the expert GEMMs' layout: sorted position r, or e·pitch + (r − seg[e])
/// when every expert's rows are padded to `pitch` (pitch 0: not padded); −1 when the capacity limit
/// drops it (expert e keeps its first kept[e] rows). slot_of is indexed by entry, row_pos by r.
DRDIFF_KERNEL void moe_invert_kernel(unsigned const* sorted_entries, unsigned const* sorted_keys, int rows,
                                         int const* seg, int const* kept, int pitch, int* slot_of, int* row_pos) {
  int const r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  int const e = int(sorted_keys[r]), i = r - seg[e];
  int const pos = i >= kept[e] ? -1 : (pitch ? e * pitch + i : r);
  slot_of[sorted_entries[r]] = pos;
  row_pos[r] = pos;
}

}  // namespace detail
DRDIFF_NAMESPACE_END
