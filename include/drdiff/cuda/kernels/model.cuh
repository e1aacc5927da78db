#pragma once
/// \file
/// The CUDA kernels of the model's layers (cuda/model.cuh launches them): LayerNorm into bf16 (a
/// block per row; register-resident rows where d allows), the RoPE table and rotation, the time
/// MLP's matrix-vector product, the row softmax of the categorical prediction, and the functors of
/// the elementwise steps that run as Thrust transforms.

#include <drdiff/core/config.hpp>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/solver/noise.hpp>

#include <cub/block/block_reduce.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

using bf16 = __nv_bfloat16;

/// Blocks of 256 threads for a grid-stride loop over n elements (32 per SM at most).
inline unsigned model_grid(std::size_t n) { return stride_grid(n, 256, 32); }

// The elementwise steps (fp32 → bf16, the bias and time-embedding adds, the initial state) are
// Thrust transforms over these functors (cuda/model.cuh); the kernels below are the ones that fuse
// a reduction or a vector layout that a transform cannot express.

struct model_to_bf16_op {
  __device__ bf16 operator()(float x) const { return __float2bfloat16(x); }
};
/// h[i] += a[i % d] + b[i % d] (a, b optional), fp32, for index i.
struct model_add_rows_op {
  float* h;
  float const *a, *b;
  int d;
  __device__ void operator()(std::size_t i) const {
    int const k = int(i % std::size_t(d));
    h[i] += (a ? a[k] : 0.f) + (b ? b[k] : 0.f);
  }
};
/// The initial state at index i: target tokens get N(0, 1) noise (counter-based, as on the CPU) plus
/// m, prompt tokens their clean embedding.
struct model_initial_state_op {
  float const* clean;
  unsigned char const* target;
  float const* m;
  solver::gaussian_noise noise;
  int d;
  __device__ float operator()(std::size_t i) const {
    return target[i / std::size_t(d)] ? float(noise(0, i)) + m[i % std::size_t(d)] : clean[i];
  }
};

/// Sum over the 128 threads of a block (red: 4 floats of shared memory; safe to call again at once).
__device__ inline float model_block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  return red[0] + red[1] + red[2] + red[3];
}

/// LayerNorm of fp32 rows into bf16, one block of 128 threads per row (statistics in fp32, two passes).
DRDIFF_KERNEL void __launch_bounds__(128) model_layer_norm(float const* __restrict__ x, int d, float const* __restrict__ g,
                                                       float const* __restrict__ b, float eps, bf16* __restrict__ y) {
  __shared__ float red[4];
  float const* xr = x + std::size_t(blockIdx.x) * d;
  float s = 0.f;
  for (int k = threadIdx.x; k < d; k += 128) s += xr[k];
  float const mean = model_block_sum(s, red) / d;
  float q = 0.f;
  for (int k = threadIdx.x; k < d; k += 128) q += (xr[k] - mean) * (xr[k] - mean);
  float const inv = rsqrtf(model_block_sum(q, red) / d + eps);
  for (int k = threadIdx.x; k < d; k += 128)
    y[std::size_t(blockIdx.x) * d + k] = __float2bfloat16((xr[k] - mean) * inv * g[k] + b[k]);
}

/// The same for d a multiple of 4 and at most 512·K: each thread keeps its K float4 pieces of the row
/// in registers, so the row is read from memory once (the same two-pass statistics).
template <int K>
DRDIFF_KERNEL void __launch_bounds__(128) model_layer_norm_vec(float const* __restrict__ x, int d,
                                                           float const* __restrict__ g, float const* __restrict__ b,
                                                           float eps, bf16* __restrict__ y) {
  __shared__ float red[4];
  int const n4 = d / 4;
  auto const* xr = reinterpret_cast<float4 const*>(x + std::size_t(blockIdx.x) * d);
  float4 v[K];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int const i = int(threadIdx.x) + 128 * k;
    v[k] = i < n4 ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    s += (v[k].x + v[k].y) + (v[k].z + v[k].w);
  }
  float const mean = model_block_sum(s, red) / d;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (int(threadIdx.x) + 128 * k < n4) {
      float const a = v[k].x - mean, c = v[k].y - mean, e = v[k].z - mean, f = v[k].w - mean;
      q += (a * a + c * c) + (e * e + f * f);
    }
  float const inv = rsqrtf(model_block_sum(q, red) / d + eps);
  auto* const yr = reinterpret_cast<uint2*>(y + std::size_t(blockIdx.x) * d);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int const i = int(threadIdx.x) + 128 * k;
    if (i >= n4) continue;
    float4 const gg = reinterpret_cast<float4 const*>(g)[i], bb = reinterpret_cast<float4 const*>(b)[i];
    __nv_bfloat162 const lo = __floats2bfloat162_rn((v[k].x - mean) * inv * gg.x + bb.x,
                                                    (v[k].y - mean) * inv * gg.y + bb.y);
    __nv_bfloat162 const hi = __floats2bfloat162_rn((v[k].z - mean) * inv * gg.z + bb.z,
                                                    (v[k].w - mean) * inv * gg.w + bb.w);
    uint2 o;
    o.x = *reinterpret_cast<unsigned const*>(&lo);
    o.y = *reinterpret_cast<unsigned const*>(&hi);
    yr[i] = o;
  }
}

/// The RoPE table: cos and sin of p·base^(−2i/hd) for every position p < seq and pair i < hd/2, computed
/// in double as on the CPU (once per sequence length).
DRDIFF_KERNEL void model_rope_table(float* __restrict__ cs, float* __restrict__ sn, int seq, int half, double base,
                                    int pos0) {
  std::size_t const n = std::size_t(seq) * half;
  DRDIFF_GRID_STRIDE(i, n) {
    int const pair = int(i % half);
    double const a = double(pos0 + std::int64_t(i / half)) * pow(base, -2.0 * pair / (2 * half));
    cs[i] = float(cos(a));
    sn[i] = float(sin(a));
  }
}

/// RoPE on q and k of a [T, 3·d_model] bf16 buffer from the table: one thread per 16-byte piece (4
/// pairs) of a token's q or k (head_dim a multiple of 8, so pieces never straddle heads).
DRDIFF_KERNEL void model_rope(bf16* __restrict__ qkv, float const* __restrict__ cs, float const* __restrict__ sn,
                           std::int64_t tokens, int seq, int dm, int hd) {
  int const pieces = dm / 8, half = hd / 2;  // pieces per part (q or k) of a token
  std::size_t const n = std::size_t(tokens) * 2 * pieces;
  DRDIFF_GRID_STRIDE(i, n) {
    int const c = int(i % pieces);
    std::size_t const rest = i / pieces;
    int const part = int(rest % 2);
    std::int64_t const r = std::int64_t(rest / 2);
    int const pair0 = (c * 8 % hd) / 2;
    std::size_t const at = std::size_t(r % seq) * half + pair0;
    float4 const cv = *reinterpret_cast<float4 const*>(cs + at), sv = *reinterpret_cast<float4 const*>(sn + at);
    float const cc[4] = {cv.x, cv.y, cv.z, cv.w}, ss[4] = {sv.x, sv.y, sv.z, sv.w};
    uint4* const p = reinterpret_cast<uint4*>(qkv + std::size_t(r) * 3 * dm + std::size_t(part) * dm + std::size_t(c) * 8);
    uint4 v = *p;
    __nv_bfloat162* const e = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float2 const ab = __bfloat1622float2(e[k]);
      e[k] = __floats2bfloat162_rn(ab.x * cc[k] - ab.y * ss[k], ab.x * ss[k] + ab.y * cc[k]);
    }
    *p = v;
  }
}

/// y[o] = act(Σ_i W[o, i]·x[i] + b[o]): one warp per output (the time MLP).
DRDIFF_KERNEL void model_matvec(bf16 const* __restrict__ w, float const* __restrict__ x, float const* __restrict__ b,
                             int out, int in, bool silu, float* __restrict__ y) {
  int const o = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (o >= out) return;
  float acc = 0.f;
  for (int i = lane; i < in; i += 32) acc += __bfloat162float(w[std::size_t(o) * in + i]) * x[i];
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) {
    acc += b[o];
    y[o] = silu ? acc / (1.f + __expf(-acc)) : acc;
  }
}

#undef DRDIFF_GRID_STRIDE

struct model_max_op {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

/// In place on each row of L [rows × vocab] (fp32): softmax. A NaN in a row makes the whole row
/// NaN, so the categorical x̂0 of that token is NaN and the solver reports it (never a plausible row).
template <int Threads>
DRDIFF_KERNEL void __launch_bounds__(Threads) model_softmax_rows(float* __restrict__ L, int vocab) {
  using reduce = cub::BlockReduce<float, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ float bcast;
  float* row = L + std::size_t(blockIdx.x) * vocab;
  float mx = -INFINITY, nan = 0.f;
  for (int v = threadIdx.x; v < vocab; v += Threads) {
    float const x = row[v];
    nan += isnan(x) ? 1.f : 0.f;
    mx = fmaxf(mx, x);
  }
  float const bmx = reduce(tmp).Reduce(mx, model_max_op{});
  if (threadIdx.x == 0) bcast = bmx;
  __syncthreads();
  float const m = bcast;
  __syncthreads();
  float const bnan = reduce(tmp).Sum(nan);
  __syncthreads();
  float sum = 0.f;
  for (int v = threadIdx.x; v < vocab; v += Threads) sum += (row[v] = __expf(row[v] - m));
  float const bsum = reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) bcast = bnan > 0.f ? NAN : 1.f / bsum;
  __syncthreads();
  float const inv = bcast;
  for (int v = threadIdx.x; v < vocab; v += Threads) row[v] *= inv;
}

}  // namespace detail
DRDIFF_NAMESPACE_END
