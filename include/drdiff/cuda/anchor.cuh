#pragma once
/// \file
/// CUDA side of the semantic anchor states (the counterpart of cpu/anchor.hpp, with the same calls):
/// the soft absorbing forward process (the same counter-based numbers as the CPU), the projectors
/// (cuBLAS GEMMs + small kernels), rounding to the nearest embedding (cuBLAS scores in fp32, one CUB
/// block arg-max per token), and the blend / re-anchoring behind anchor::guidance and
/// anchor::keep_clean. Device pointers throughout; the cuBLAS handle is the context's
/// (context<cuda>::cublas); scratch is the caller's (query workspace_bytes first). The kernels are
/// in cuda/kernels/anchor.cuh. Link CUDA::cublas.

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/anchor/guidance.hpp>
#include <drdiff/anchor/projectors.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/cuda/detail/blas.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/kernels/anchor.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/cuda/tuning.cuh>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Blocks of `threads` for the anchor kernels' grid-stride loops (32 per SM at most).
inline unsigned anchor_grid(std::size_t n, int threads) { return stride_grid(n, threads, 32); }

/// The context's cuBLAS handle, on the call's stream (a null handle is an error naming `who`).
inline cublasHandle_t anchor_blas(context<cuda> const& ctx, char const* who) {
  DRDIFF_CHECK(ctx.cublas != nullptr, who, " (cuda): context<cuda>::cublas is null; this call runs cuBLAS GEMMs on "
               "the caller's handle");
  cublas_check(cublasSetStream(ctx.cublas, cuda_stream(ctx)), "cublasSetStream");
  return ctx.cublas;
}

/// Row stride of the rounding's score block: the vocabulary rounded up to 32 columns, so that cuBLAS
/// writes aligned rows (an odd stride such as 50257 costs it 5× at d = 128).
inline int anchor_score_ld(int vocab) noexcept { return (vocab + 31) / 32 * 32; }

/// The rounding's scratch: −½‖E_v‖² per row, one block of scores, the non-finite flag.
struct anchor_round_buffers {
  float* bias;
  float* scores;
  int* bad;
};
template <class T>
anchor_round_buffers anchor_round_carve(workspace_carver& w, anchor::nearest_embedding<T> const& p,
                                        anchor::token_shape const& s) {
  std::size_t const chunk = std::size_t(std::min<std::int64_t>(s.tokens(), cuda_round_chunk_tokens));
  anchor_round_buffers b{};
  b.bias = w.take<float>(std::size_t(p.vocab));
  b.scores = w.take<float>(chunk * std::size_t(anchor_score_ld(p.vocab)));
  b.bad = w.take<int>(1);
  return b;
}

/// segment_pool's scratch: the segment means, their low-rank codes and the projected anchors.
template <class T>
struct anchor_pool_buffers {
  T *means, *z, *up;
};
template <class T>
anchor_pool_buffers<T> anchor_pool_carve(workspace_carver& w, anchor::segment_pool<T> const& p,
                                         anchor::token_shape const& s) {
  std::size_t const segs = std::size_t(s.batch) * p.segments(s.seq);
  anchor_pool_buffers<T> b{};
  b.means = w.take<T>(segs * std::size_t(s.dim));
  b.z = w.take<T>(segs * std::size_t(std::max(p.rank, 1)));
  b.up = w.take<T>(segs * std::size_t(s.dim));
  return b;
}

/// scores[rows × vocab] (row stride ld) = x · tableᵀ in fp32. cuBLAS picks slow kernels when the
/// vocabulary is not a multiple of 8 (50257: 5× slower at d = 128), so the GEMM runs on the largest
/// multiple of 128 rows of the table and a second one covers the rest.
template <class T>
void anchor_score_gemm(cublasHandle_t blas, int rows, int vocab, int dim, T const* x, T const* table, float* scores,
                       int ld) {
  int const main = vocab / 128 * 128, tail = vocab - main;
  gemm_abt(blas, rows, main, dim, x, dim, table, dim, scores, ld);
  if (tail) gemm_abt(blas, rows, tail, dim, x, dim, table + std::size_t(main) * dim, dim, scores + main, ld);
}

template <>
struct anchor_blend_impl<cuda> {
  template <class T>
  static void run(context<cuda> const& ctx, T* x0, T const* p, double gamma, std::size_t n) {
    anchor_blend_kernel<T><<<anchor_grid(n, 256), 256, 0, cuda_stream(ctx)>>>(x0, p, T(gamma), n);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
};
template <>
struct anchor_keep_impl<cuda> {
  template <class T>
  static void run(context<cuda> const& ctx, T* x, T const* clean, unsigned char const* target,
                  anchor::token_shape const& s) {
    std::size_t const n = std::size_t(s.elements());
    anchor_keep_kernel<T><<<anchor_grid(n, 256), 256, 0, cuda_stream(ctx)>>>(x, clean, target, n, s.dim);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
};

}  // namespace detail

namespace anchor {

// ---- soft absorbing state ------------------------------------------------------------------------

/// x_t from x_0 on the GPU (device x0, m, target, xt; host alpha_bar). Same numbers as the CPU.
template <class T>
void absorb(context<drdiff::cuda> const& ctx, soft_absorbing const& s, absorb_args<T> const& a) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff::anchor::absorb (cuda): element types are float or __nv_bfloat16");
  using drdiff::detail::anchor_absorb_group;
  a.validate(s);
  auto const noise = detail::absorb_noise(s, a.stream);
  for (int b0 = 0; b0 < a.shape.batch; b0 += anchor_absorb_group) {
    int const nb = std::min(anchor_absorb_group, a.shape.batch - b0);
    drdiff::detail::anchor_absorb_params p{};
    for (int b = 0; b < nb; ++b) p.alpha_bar[b] = a.alpha_bar[b0 + b];
    std::int64_t const tokens = std::int64_t(nb) * a.shape.seq;
    drdiff::detail::anchor_absorb_kernel<T>
        <<<drdiff::detail::anchor_grid(std::size_t(tokens) * a.shape.dim, 256), 256, 0,
           drdiff::detail::cuda_stream(ctx)>>>(s, noise, a.x0, a.maybe_m, a.maybe_target, a.xt, a.stream,
                                              std::int64_t(b0) * a.shape.seq, tokens, a.shape.seq, a.shape.dim, b0,
                                              p);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
}

// ---- projectors ----------------------------------------------------------------------------------

template <class T>
std::size_t workspace_bytes(context<drdiff::cuda> const&, nearest_embedding<T> const& p, token_shape const& s) {
  return drdiff::detail::workspace_size(
      [&](drdiff::detail::workspace_carver& w) { drdiff::detail::anchor_round_carve(w, p, s); });
}
template <class T>
std::size_t workspace_bytes(context<drdiff::cuda> const&, segment_pool<T> const& p, token_shape const& s) {
  return drdiff::detail::workspace_size(
      [&](drdiff::detail::workspace_carver& w) { drdiff::detail::anchor_pool_carve(w, p, s); });
}
template <class P>
std::size_t workspace_bytes(context<drdiff::cuda> const&, P const&, token_shape const&) {
  static_assert(is_projector_v<P>, "drdiff::anchor::workspace_bytes: P is not an anchor projector");
  return 0;
}

/// Rounding on the GPU: ids[token] (device) = the best table row; also writes that row to maybe_out.
/// Scores come from cuBLAS in fp32 (bf16 inputs: fp32 accumulation), chunk by chunk.
template <class T>
void round_to_nearest(context<drdiff::cuda> const& ctx, nearest_embedding<T> const& p, token_shape const& shape,
                      T const* x, int* ids, T* maybe_out, void* workspace, std::size_t bytes) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff::anchor::round_to_nearest (cuda): element types are float or __nv_bfloat16");
  namespace dd = drdiff::detail;
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr, "round_to_nearest: x is a null pointer");
  DRDIFF_CHECK(ids != nullptr, "round_to_nearest: ids is a null pointer");
  DRDIFF_CHECK(maybe_out != x, "round_to_nearest: out must not be x");
  std::size_t const need = workspace_bytes(ctx, p, shape);
  DRDIFF_CHECK(workspace != nullptr && bytes >= need, "round_to_nearest: workspace of ", bytes,
               " bytes is smaller than the ", need, " bytes it needs (or null)");
  cublasHandle_t const blas = dd::anchor_blas(ctx, "round_to_nearest");
  cudaStream_t const st = dd::cuda_stream(ctx);
  dd::workspace_carver w(workspace);
  dd::anchor_round_buffers const buf = dd::anchor_round_carve(w, p, shape);
  std::int64_t const tokens = shape.tokens();
  int const chunk = int(std::min<std::int64_t>(tokens, dd::cuda_round_chunk_tokens));
  int const ld = dd::anchor_score_ld(p.vocab);
  DRDIFF_CUDA_CHECK(cudaMemsetAsync(buf.bad, 0, sizeof(int), st));
  dd::anchor_half_norm_kernel<T><<<(p.vocab + 7) / 8, 256, 0, st>>>(p.table, p.vocab, p.dim, p.score == metric::l2,
                                                                     buf.bias);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
  for (std::int64_t t0 = 0; t0 < tokens; t0 += chunk) {
    int const rows = int(std::min<std::int64_t>(chunk, tokens - t0));
    dd::anchor_score_gemm(blas, rows, p.vocab, p.dim, x + t0 * p.dim, p.table, buf.scores, ld);
    dd::anchor_argmax_kernel<T, 256><<<rows, 256, 0, st>>>(buf.scores, buf.bias, p.vocab, ld, p.dim, p.table, t0, ids,
                                                           maybe_out, buf.bad);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
  int h_bad = 0;
  DRDIFF_CUDA_CHECK(cudaMemcpyAsync(&h_bad, buf.bad, sizeof(int), cudaMemcpyDeviceToHost, st));
  DRDIFF_CUDA_CHECK(cudaStreamSynchronize(st));
  DRDIFF_CHECK(h_bad == 0, "round_to_nearest: a token has no finite score (NaN or infinite input)");
}

template <class T>
void project(context<drdiff::cuda> const& ctx, identity const& p, token_shape const& shape, T const* x, T* out,
             void* = nullptr, std::size_t = 0) {
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr && out != nullptr, "identity: x or out is a null pointer");
  if (x != out)
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(out, x, sizeof(T) * std::size_t(shape.elements()), cudaMemcpyDeviceToDevice,
                                      drdiff::detail::cuda_stream(ctx)));
}

/// Nearest-embedding clamp: the rounding's scratch, then the ids.
template <class T>
std::size_t clamp_workspace_bytes(context<drdiff::cuda> const& ctx, nearest_embedding<T> const& p,
                                  token_shape const& s) {
  return workspace_bytes(ctx, p, s) + drdiff::detail::workspace_size([&](drdiff::detail::workspace_carver& w) {
           w.take<int>(std::size_t(s.tokens()));
         });
}
template <class T>
void project(context<drdiff::cuda> const& ctx, nearest_embedding<T> const& p, token_shape const& shape, T const* x,
             T* out, void* workspace, std::size_t bytes) {
  DRDIFF_CHECK(x != out, "nearest_embedding: out must not be x (this projector does not work in place)");
  std::size_t const need = clamp_workspace_bytes(ctx, p, shape);
  DRDIFF_CHECK(workspace != nullptr && bytes >= need, "nearest_embedding: workspace of ", bytes,
               " bytes is smaller than the ", need, " bytes it needs (clamp_workspace_bytes)");
  std::size_t const inner = workspace_bytes(ctx, p, shape);
  drdiff::detail::workspace_carver w(static_cast<char*>(workspace) + inner);
  int* const ids = w.take<int>(std::size_t(shape.tokens()));
  round_to_nearest(ctx, p, shape, x, ids, out, workspace, inner);
}

template <class T>
void project(context<drdiff::cuda> const& ctx, segment_pool<T> const& p, token_shape const& shape, T const* x, T* out,
             void* workspace, std::size_t bytes) {
  static_assert(std::is_same_v<T, float>, "drdiff::anchor::segment_pool (cuda): float only");
  namespace dd = drdiff::detail;
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr && out != nullptr && x != out, "segment_pool: x and out must be distinct, non-null");
  std::size_t const need = workspace_bytes(ctx, p, shape);
  DRDIFF_CHECK(workspace != nullptr && bytes >= need, "segment_pool: workspace of ", bytes,
               " bytes is smaller than the ", need, " bytes it needs (or null)");
  cudaStream_t const st = dd::cuda_stream(ctx);
  int const per_seq = p.segments(shape.seq), segs = shape.batch * per_seq, d = shape.dim;
  dd::workspace_carver w(workspace);
  dd::anchor_pool_buffers<T> const buf = dd::anchor_pool_carve(w, p, shape);
  dd::anchor_segment_mean_kernel<T><<<dd::anchor_grid(std::size_t(segs) * d, 256), 256, 0, st>>>(
      x, shape.batch, shape.seq, d, p.length, per_seq, buf.means);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
  T const* anchors = buf.means;
  if (p.rank > 0) {
    cublasHandle_t const blas = dd::anchor_blas(ctx, "segment_pool");
    dd::gemm_abt(blas, segs, p.rank, d, buf.means, d, p.maybe_down, d, buf.z, p.rank);
    dd::gemm_abt(blas, segs, d, p.rank, buf.z, p.rank, p.maybe_up, p.rank, buf.up, d);
    anchors = buf.up;
  }
  dd::anchor_segment_broadcast_kernel<T><<<dd::anchor_grid(std::size_t(shape.elements()), 256), 256, 0, st>>>(
      anchors, shape.batch, shape.seq, d, p.length, per_seq, out);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void project(context<drdiff::cuda> const& ctx, linear<T> const& p, token_shape const& shape, T const* x, T* out,
             void* = nullptr, std::size_t = 0) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff::anchor::linear (cuda): element types are float or __nv_bfloat16");
  namespace dd = drdiff::detail;
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr && out != nullptr && x != out, "linear: x and out must be distinct, non-null");
  cublasHandle_t const blas = dd::anchor_blas(ctx, "linear");
  std::int64_t const tokens = shape.tokens();
  DRDIFF_CHECK(tokens <= 0x7fffffff, "linear (cuda): tokens = ", tokens, " exceeds the cuBLAS int range");
  dd::gemm_abt(blas, int(tokens), p.dim, p.dim, x, p.dim, p.weight, p.dim, out, p.dim);
  if (p.maybe_bias) {
    dd::anchor_add_bias_kernel<T><<<dd::anchor_grid(std::size_t(shape.elements()), 256), 256, 0, dd::cuda_stream(ctx)>>>(
        out, p.maybe_bias, std::size_t(shape.elements()), p.dim);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
}

/// A projector bound to its context (stream, device, cuBLAS handle), shape and scratch: callable as
/// project(x, out).
template <class P, class T>
struct cuda_projector {
  context<drdiff::cuda> ctx{};
  P p{};
  token_shape shape{};
  void* workspace = nullptr;
  std::size_t bytes = 0;
  void operator()(T const* x, T* out) const { project(ctx, p, shape, x, out, workspace, bytes); }
};
/// bind<T>(ctx, projector, shape, workspace, bytes); the scratch: projector_workspace_bytes.
template <class T, class P>
cuda_projector<P, T> bind(context<drdiff::cuda> const& ctx, P const& p, token_shape const& shape,
                          void* workspace = nullptr, std::size_t bytes = 0) {
  static_assert(is_projector_v<P>, "drdiff::anchor::bind: P is not an anchor projector");
  p.validate(shape);
  return {ctx, p, shape, workspace, bytes};
}
/// Scratch bytes of project() for any projector on the GPU.
template <class P>
std::size_t projector_workspace_bytes(context<drdiff::cuda> const& ctx, P const& p, token_shape const& s) {
  if constexpr (std::is_same_v<P, nearest_embedding<float>> || std::is_same_v<P, nearest_embedding<__nv_bfloat16>>)
    return clamp_workspace_bytes(ctx, p, s);
  else
    return workspace_bytes(ctx, p, s);
}

}  // namespace anchor
DRDIFF_NAMESPACE_END
