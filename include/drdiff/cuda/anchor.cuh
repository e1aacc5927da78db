#pragma once
/// \file
/// CUDA side of the semantic anchor states (the counterpart of cpu/anchor.hpp): the soft absorbing
/// forward process (the same counter-based numbers as the CPU), the projectors (cuBLAS GEMMs + small
/// kernels), rounding to the nearest embedding (cuBLAS scores in fp32, one CUB block arg-max per
/// token), and the blend / re-anchoring kernels behind anchor::guidance and anchor::keep_clean.
/// Device pointers throughout; scratch is the caller's (query workspace_bytes first).

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/anchor/guidance.hpp>
#include <drdiff/anchor/projectors.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/cuda/detail/blas.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/launch.cuh>

#include <cub/block/block_reduce.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace anchor {
namespace detail {

inline cudaStream_t stream_of(context<drdiff::cuda> const& ctx) { return reinterpret_cast<cudaStream_t>(ctx.stream); }
inline unsigned grid_for(std::size_t n, int threads) {
  return drdiff::detail::stride_grid(n, threads, 32);
}
template <class T>
__device__ __forceinline__ float to_f(T v) { return float(v); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
__device__ __forceinline__ T from_d(double v) { return T(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_d<__nv_bfloat16>(double v) { return __float2bfloat16(float(v)); }

inline constexpr int absorb_group = 256;  ///< sequences per launch (their ᾱ travel as a kernel parameter)
struct absorb_group_params {
  double alpha_bar[absorb_group];
};

template <class T>
__global__ void absorb_kernel(soft_absorbing s, solver::gaussian_noise noise, T const* __restrict__ x0,
                              T const* __restrict__ m, unsigned char const* __restrict__ target, T* __restrict__ xt,
                              std::uint64_t stream, std::int64_t first_token, std::int64_t tokens, int seq, int dim,
                              int first_seq, absorb_group_params ab) {
  std::size_t const n = std::size_t(tokens) * dim;
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) {
    std::int64_t const tok = first_token + std::int64_t(j / dim);
    int const k = int(j % dim);
    std::size_t const i = std::size_t(tok) * dim + k;
    double const a = ab.alpha_bar[int(tok / seq) - first_seq];
    bool const tgt = target == nullptr || target[tok] != 0;
    bool const rep = tgt && absorbed(s, stream, std::uint64_t(tok), a);
    double const eps = (tgt && !rep) ? noise(0, i) : 0.0;
    xt[i] = from_d<T>(absorb_value(double(to_f(x0[i])), m ? double(to_f(m[k])) : 0.0, a, tgt, rep, eps));
  }
}

/// bias[v] = −½‖E_v‖² (l2) or 0 (dot): one warp per row.
template <class T>
__global__ void half_norm_kernel(T const* __restrict__ table, int vocab, int dim, bool l2, float* __restrict__ bias) {
  int const warp = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (warp >= vocab) return;
  float acc = 0.f;
  if (l2)
    for (int k = lane; k < dim; k += 32) {
      float const e = to_f(table[std::size_t(warp) * dim + k]);
      acc += e * e;
    }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) bias[warp] = -0.5f * acc;
}

struct best_pair {
  float score;
  int id;
};
struct best_op {
  __device__ __forceinline__ best_pair operator()(best_pair a, best_pair b) const {
    return (b.score > a.score || (b.score == a.score && b.id < a.id)) ? b : a;
  }
};

/// One block per token: arg-max of scores + bias (ties → smaller id); writes the id, the table row
/// into out (optional) and flags a non-finite best score.
template <class T, int Threads>
__global__ void __launch_bounds__(Threads) argmax_kernel(float const* __restrict__ scores, float const* __restrict__ bias,
                                                         int vocab, int ld, int dim, T const* __restrict__ table,
                                                         std::int64_t first_token, int* __restrict__ ids,
                                                         T* __restrict__ out, int* __restrict__ bad) {
  using reduce = cub::BlockReduce<best_pair, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ int chosen;
  float const* row = scores + std::size_t(blockIdx.x) * ld;
  best_pair b{-INFINITY, 0x7fffffff};
  for (int v = threadIdx.x; v < vocab; v += Threads) {
    float const s = row[v] + bias[v];
    if (s > b.score) b = {s, v};  // a thread visits ids in ascending order: strict keeps the smaller
  }
  best_pair const r = reduce(tmp).Reduce(b, best_op{});
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
__global__ void segment_mean_kernel(T const* __restrict__ x, int batch, int seq, int dim, int length, int per_seq,
                                    T* __restrict__ means) {
  std::size_t const n = std::size_t(batch) * per_seq * dim;
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) {
    int const k = int(j % dim);
    std::size_t const seg = j / dim;
    int const b = int(seg / per_seq), g = int(seg % per_seq);
    int const i0 = g * length, i1 = min(seq, i0 + length);
    float acc = 0.f;
    for (int i = i0; i < i1; ++i) acc += to_f(x[(std::size_t(b) * seq + i) * dim + k]);
    means[j] = T(acc / float(i1 - i0));
  }
}

template <class T>
__global__ void segment_broadcast_kernel(T const* __restrict__ anchors, int batch, int seq, int dim, int length,
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
__global__ void add_bias_kernel(T* __restrict__ out, T const* __restrict__ bias, std::size_t n, int dim) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) out[j] += bias[j % dim];
}

template <class T>
__global__ void blend_kernel(T* __restrict__ x0, T const* __restrict__ p, T g, std::size_t n) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride) x0[j] += g * (p[j] - x0[j]);
}

template <class T>
__global__ void keep_kernel(T* __restrict__ x, T const* __restrict__ clean, unsigned char const* __restrict__ target,
                            std::size_t n, int dim) {
  std::size_t const stride = std::size_t(gridDim.x) * blockDim.x;
  for (std::size_t j = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; j < n; j += stride)
    if (target[j / dim] == 0) x[j] = clean[j];
}

inline std::size_t align256(std::size_t b) { return (b + 255) / 256 * 256; }
inline void set_stream(cublasHandle_t h, context<drdiff::cuda> const& ctx) {
  DRDIFF_CHECK(h != nullptr, "anchor (cuda): the cuBLAS handle is null");
  drdiff::detail::cublas_check(cublasSetStream(h, stream_of(ctx)), "cublasSetStream");
}

}  // namespace detail

// ---- soft absorbing state ------------------------------------------------------------------------

/// x_t from x_0 on the GPU (device x0, m, target, xt; host alpha_bar). Same numbers as the CPU.
template <class T>
void absorb(context<drdiff::cuda> const& ctx, soft_absorbing const& s, absorb_args<T> const& a) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff::anchor::absorb (cuda): element types are float or __nv_bfloat16");
  a.validate(s);
  auto const noise = detail::absorb_noise(s, a.stream);
  for (int b0 = 0; b0 < a.shape.batch; b0 += detail::absorb_group) {
    int const nb = std::min(detail::absorb_group, a.shape.batch - b0);
    detail::absorb_group_params p{};
    for (int b = 0; b < nb; ++b) p.alpha_bar[b] = a.alpha_bar[b0 + b];
    std::int64_t const tokens = std::int64_t(nb) * a.shape.seq;
    detail::absorb_kernel<T><<<detail::grid_for(std::size_t(tokens) * a.shape.dim, 256), 256, 0,
                               detail::stream_of(ctx)>>>(s, noise, a.x0, a.maybe_m, a.maybe_target, a.xt, a.stream,
                                                         std::int64_t(b0) * a.shape.seq, tokens, a.shape.seq,
                                                         a.shape.dim, b0, p);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
}

// ---- projectors ----------------------------------------------------------------------------------

/// Tokens per score block of the GPU rounding (scores are chunk × score_ld fp32 values of scratch).
inline constexpr int round_chunk_tokens = 2048;
/// Row stride of the score block: the vocabulary rounded up to 32 columns, so that cuBLAS writes
/// aligned rows (an odd stride such as 50257 costs it 5× at d = 128).
inline int score_ld(int vocab) noexcept { return (vocab + 31) / 32 * 32; }

/// scores[rows × vocab] (row stride ld) = x · tableᵀ in fp32. cuBLAS picks slow kernels when the
/// vocabulary is not a multiple of 8 (50257: 5× slower at d = 128), so the GEMM runs on the largest
/// multiple of 128 rows of the table and a second one covers the rest.
template <class T>
void score_gemm(cublasHandle_t blas, int rows, int vocab, int dim, T const* x, T const* table, float* scores, int ld) {
  int const main = vocab / 128 * 128, tail = vocab - main;
  drdiff::detail::gemm_abt(blas, rows, main, dim, x, dim, table, dim, scores, ld);
  if (tail) drdiff::detail::gemm_abt(blas, rows, tail, dim, x, dim, table + std::size_t(main) * dim, dim, scores + main, ld);
}

template <class T>
std::size_t workspace_bytes(context<drdiff::cuda> const&, nearest_embedding<T> const& p, token_shape const& s) {
  std::size_t const chunk = std::size_t(std::min<std::int64_t>(s.tokens(), round_chunk_tokens));
  return detail::align256(sizeof(float) * std::size_t(p.vocab)) +
         detail::align256(sizeof(float) * chunk * std::size_t(score_ld(p.vocab))) +
         detail::align256(sizeof(int));
}
template <class T>
std::size_t workspace_bytes(context<drdiff::cuda> const&, segment_pool<T> const& p, token_shape const& s) {
  std::size_t const segs = std::size_t(s.batch) * p.segments(s.seq);
  return 2 * detail::align256(sizeof(T) * segs * s.dim) + detail::align256(sizeof(T) * segs * std::max(p.rank, 1));
}
template <class P>
std::size_t workspace_bytes(context<drdiff::cuda> const&, P const&, token_shape const&) {
  static_assert(is_projector_v<P>, "drdiff::anchor::workspace_bytes: P is not an anchor projector");
  return 0;
}

/// Rounding on the GPU: ids[token] (device) = the best table row; also writes that row to maybe_out.
/// Scores come from cuBLAS in fp32 (bf16 inputs: fp32 accumulation), chunk by chunk.
template <class T>
void round_to_nearest(context<drdiff::cuda> const& ctx, cublasHandle_t blas, nearest_embedding<T> const& p,
                      token_shape const& shape, T const* x, int* ids, T* maybe_out, void* workspace,
                      std::size_t bytes) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff::anchor::round_to_nearest (cuda): element types are float or __nv_bfloat16");
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr, "round_to_nearest: x is a null pointer");
  DRDIFF_CHECK(ids != nullptr, "round_to_nearest: ids is a null pointer");
  DRDIFF_CHECK(maybe_out != x, "round_to_nearest: out must not be x");
  std::size_t const need = workspace_bytes(ctx, p, shape);
  DRDIFF_CHECK(workspace != nullptr && bytes >= need, "round_to_nearest: workspace of ", bytes,
               " bytes is smaller than the ", need, " bytes it needs (or null)");
  detail::set_stream(blas, ctx);
  auto const st = detail::stream_of(ctx);
  char* w = static_cast<char*>(workspace);
  float* const bias = reinterpret_cast<float*>(w);
  w += detail::align256(sizeof(float) * p.vocab);
  std::int64_t const tokens = shape.tokens();
  int const chunk = int(std::min<std::int64_t>(tokens, round_chunk_tokens));
  float* const scores = reinterpret_cast<float*>(w);
  int const ld = score_ld(p.vocab);
  w += detail::align256(sizeof(float) * std::size_t(chunk) * ld);
  int* const bad = reinterpret_cast<int*>(w);
  DRDIFF_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int), st));
  detail::half_norm_kernel<T><<<(p.vocab + 7) / 8, 256, 0, st>>>(p.table, p.vocab, p.dim, p.score == metric::l2, bias);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
  for (std::int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    int const rows = int(std::min<std::int64_t>(chunk, tokens - t0));
    score_gemm(blas, rows, p.vocab, p.dim, x + t0 * p.dim, p.table, scores, ld);
    detail::argmax_kernel<T, 256><<<rows, 256, 0, st>>>(scores, bias, p.vocab, ld, p.dim, p.table, t0, ids, maybe_out,
                                                        bad);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
  int h_bad = 0;
  DRDIFF_CUDA_CHECK(cudaMemcpyAsync(&h_bad, bad, sizeof(int), cudaMemcpyDeviceToHost, st));
  DRDIFF_CUDA_CHECK(cudaStreamSynchronize(st));
  DRDIFF_CHECK(h_bad == 0, "round_to_nearest: a token has no finite score (NaN or infinite input)");
}

template <class T>
void project(context<drdiff::cuda> const& ctx, cublasHandle_t, identity const& p, token_shape const& shape, T const* x,
             T* out, void* = nullptr, std::size_t = 0) {
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr && out != nullptr, "identity: x or out is a null pointer");
  if (x != out)
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(out, x, sizeof(T) * std::size_t(shape.elements()), cudaMemcpyDeviceToDevice,
                                      detail::stream_of(ctx)));
}

/// Nearest-embedding clamp: ids go to the front of the scratch (after the rounding's own).
template <class T>
std::size_t clamp_workspace_bytes(context<drdiff::cuda> const& ctx, nearest_embedding<T> const& p,
                                  token_shape const& s) {
  return workspace_bytes(ctx, p, s) + detail::align256(sizeof(int) * std::size_t(s.tokens()));
}
template <class T>
void project(context<drdiff::cuda> const& ctx, cublasHandle_t blas, nearest_embedding<T> const& p,
             token_shape const& shape, T const* x, T* out, void* workspace, std::size_t bytes) {
  DRDIFF_CHECK(x != out, "nearest_embedding: out must not be x (this projector does not work in place)");
  std::size_t const need = clamp_workspace_bytes(ctx, p, shape);
  DRDIFF_CHECK(workspace != nullptr && bytes >= need, "nearest_embedding: workspace of ", bytes,
               " bytes is smaller than the ", need, " bytes it needs (clamp_workspace_bytes)");
  std::size_t const inner = workspace_bytes(ctx, p, shape);
  round_to_nearest(ctx, blas, p, shape, x, reinterpret_cast<int*>(static_cast<char*>(workspace) + inner), out,
                   workspace, inner);
}

template <class T>
void project(context<drdiff::cuda> const& ctx, cublasHandle_t blas, segment_pool<T> const& p, token_shape const& shape,
             T const* x, T* out, void* workspace, std::size_t bytes) {
  static_assert(std::is_same_v<T, float>, "drdiff::anchor::segment_pool (cuda): float only");
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr && out != nullptr && x != out, "segment_pool: x and out must be distinct, non-null");
  std::size_t const need = workspace_bytes(ctx, p, shape);
  DRDIFF_CHECK(workspace != nullptr && bytes >= need, "segment_pool: workspace of ", bytes,
               " bytes is smaller than the ", need, " bytes it needs (or null)");
  auto const st = detail::stream_of(ctx);
  int const per_seq = p.segments(shape.seq), segs = shape.batch * per_seq, d = shape.dim;
  T* const means = static_cast<T*>(workspace);
  T* const z = reinterpret_cast<T*>(static_cast<char*>(workspace) + detail::align256(sizeof(T) * std::size_t(segs) * d));
  T* const up = reinterpret_cast<T*>(reinterpret_cast<char*>(z) + detail::align256(sizeof(T) * std::size_t(segs) *
                                                                                     std::max(p.rank, 1)));
  detail::segment_mean_kernel<T><<<detail::grid_for(std::size_t(segs) * d, 256), 256, 0, st>>>(
      x, shape.batch, shape.seq, d, p.length, per_seq, means);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
  T const* anchors = means;
  if (p.rank > 0) {
    detail::set_stream(blas, ctx);
    drdiff::detail::gemm_abt(blas, segs, p.rank, d, means, d, p.maybe_down, d, z, p.rank);
    drdiff::detail::gemm_abt(blas, segs, d, p.rank, z, p.rank, p.maybe_up, p.rank, up, d);
    anchors = up;
  }
  detail::segment_broadcast_kernel<T><<<detail::grid_for(std::size_t(shape.elements()), 256), 256, 0, st>>>(
      anchors, shape.batch, shape.seq, d, p.length, per_seq, out);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void project(context<drdiff::cuda> const& ctx, cublasHandle_t blas, linear<T> const& p, token_shape const& shape,
             T const* x, T* out, void* = nullptr, std::size_t = 0) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff::anchor::linear (cuda): element types are float or __nv_bfloat16");
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr && out != nullptr && x != out, "linear: x and out must be distinct, non-null");
  detail::set_stream(blas, ctx);
  std::int64_t const tokens = shape.tokens();
  DRDIFF_CHECK(tokens <= 0x7fffffff, "linear (cuda): tokens = ", tokens, " exceeds the cuBLAS int range");
  drdiff::detail::gemm_abt(blas, int(tokens), p.dim, p.dim, x, p.dim, p.weight, p.dim, out, p.dim);
  if (p.maybe_bias) {
    detail::add_bias_kernel<T><<<detail::grid_for(std::size_t(shape.elements()), 256), 256, 0, detail::stream_of(ctx)>>>(
        out, p.maybe_bias, std::size_t(shape.elements()), p.dim);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
}

/// A projector bound to its context, cuBLAS handle, shape and scratch: callable as project(x, out).
template <class P, class T>
struct cuda_projector {
  context<drdiff::cuda> ctx{};
  cublasHandle_t blas = nullptr;
  P p{};
  token_shape shape{};
  void* workspace = nullptr;
  std::size_t bytes = 0;
  void operator()(T const* x, T* out) const { project(ctx, blas, p, shape, x, out, workspace, bytes); }
};
/// bind<T>(ctx, cublas, projector, shape, workspace, bytes); the scratch: projector_workspace_bytes.
template <class T, class P>
cuda_projector<P, T> bind(context<drdiff::cuda> const& ctx, cublasHandle_t blas, P const& p, token_shape const& shape,
                          void* workspace = nullptr, std::size_t bytes = 0) {
  static_assert(is_projector_v<P>, "drdiff::anchor::bind: P is not an anchor projector");
  p.validate(shape);
  return {ctx, blas, p, shape, workspace, bytes};
}
/// Scratch bytes of project() for any projector on the GPU.
template <class P>
std::size_t projector_workspace_bytes(context<drdiff::cuda> const& ctx, P const& p, token_shape const& s) {
  if constexpr (std::is_same_v<P, nearest_embedding<float>> || std::is_same_v<P, nearest_embedding<__nv_bfloat16>>)
    return clamp_workspace_bytes(ctx, p, s);
  else
    return workspace_bytes(ctx, p, s);
}

namespace detail {
template <>
struct blend_impl<drdiff::cuda> {
  template <class T>
  static void run(context<drdiff::cuda> const& ctx, T* x0, T const* p, double gamma, std::size_t n) {
    blend_kernel<T><<<grid_for(n, 256), 256, 0, stream_of(ctx)>>>(x0, p, T(gamma), n);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
};
template <>
struct keep_impl<drdiff::cuda> {
  template <class T>
  static void run(context<drdiff::cuda> const& ctx, T* x, T const* clean, unsigned char const* target,
                  token_shape const& s) {
    std::size_t const n = std::size_t(s.elements());
    keep_kernel<T><<<grid_for(n, 256), 256, 0, stream_of(ctx)>>>(x, clean, target, n, s.dim);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
};
}  // namespace detail

}  // namespace anchor
DRDIFF_NAMESPACE_END
