#pragma once
/// \file
/// CUDA backend of drdiff::attention_backward (attention/backward.hpp): bf16 and fp16 on tensor cores
/// (head_dim 64 and 128), fp32 on the SIMT kernel (any supported head_dim; for tests). The kernels are
/// in kernels/attention_backward.cuh. A call runs, on the context's stream:
///   1. D = rowsum(dO ∘ O) − ∂L/∂lse per row, and zeroes the fp32 accumulators of dQ, dK and dV;
///   2. per pass of the policy (every pass on its own: the forward's key tails and band kernel are its
///      own speed-ups), one CTA per query tile and, for a key-split pass (global rows), per key range;
///   3. the accumulators, scaled, into dq, dk and dv with their strides.
/// The workspace (caller-owned, attention_backward_workspace_bytes) holds D and the three fp32
/// accumulators: 4·(3·head_dim + 1) bytes per (batch, head, row). The accumulators are summed by
/// atomics, so results may differ in the last bits between runs (no deterministic mode yet).

#include <drdiff/attention/backward.hpp>
#include <drdiff/attention/capabilities.hpp>
#include <drdiff/cuda/attention.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/kernels/attention_backward.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/cuda/tuning.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

template <class T>
struct attention_backward_impl<cuda, T, std::enable_if_t<is_cuda_attention_type_v<T>>> {
  using forward = attention_impl<cuda, T>;
  static constexpr bool tensor_cores = forward::tensor_cores;
  /// Query rows per tile the kernels ask the policy for (and the most a tile may have).
  static constexpr int tile_rows = 64;
  template <class Policy>
  using seg_t = typename forward::template seg_t<Policy>;

  template <class Policy>
  struct plan {
    std::vector<seg_t<Policy>> heads;
    bool shared = true;     ///< every head binds to the same policy
    int passes = 0;
    std::vector<int> splits;  ///< per pass: key ranges (1: the whole pass in one CTA per tile)
    int split_keys = 0;
  };

  struct workspace_layout {
    float *drow, *dq, *dk, *dv;
  };
  static workspace_layout carve(workspace_carver& w, attention_args<T> const& f) {
    std::size_t const rows = std::size_t(f.batch) * f.heads * f.seq;
    workspace_layout l{};
    l.drow = w.take<float>(rows);
    l.dq = w.take<float>(rows * std::size_t(f.head_dim));
    l.dk = w.take<float>(rows * std::size_t(f.head_dim));
    l.dv = w.take<float>(rows * std::size_t(f.head_dim));
    return l;
  }

  static void check(attention_backward_args<T> const& a) {
    forward::check(a.fwd);
    if constexpr (tensor_cores) {  // (before the overlap tests: a misaligned d_o is named as such)
      auto const& s = a.do_strides;
      DRDIFF_CHECK(reinterpret_cast<std::uintptr_t>(a.d_o) % 16 == 0 && s.batch % 8 == 0 && s.seq % 8 == 0 &&
                       s.head % 8 == 0,
                   "attention_backward (cuda): d_o must be 16-byte aligned with strides that are multiples of 8 "
                   "elements");
    }
    validate(a, /*host_lens=*/false);
  }

  template <class Policy>
  static plan<Policy> make_plan(Policy const& policy, attention_args<T> const& a) {
    plan<Policy> pl;
    for (int h = 0; h < a.heads; ++h) pl.heads.push_back(attn::segments_of(attn::bind(policy, a.seq, h), a.seq, tile_rows));
    for (int h = 1; h < a.heads; ++h)
      if (!attn::head_independent_v<Policy> && !attn::same_pattern(pl.heads[h], pl.heads[0])) pl.shared = false;
    pl.passes = pl.heads[0].num_passes();
    for (auto const& s : pl.heads)
      DRDIFF_CHECK(s.num_passes() == pl.passes, "attention_backward (cuda): heads bind to patterns with different "
                   "pass counts ", pl.passes, " and ", s.num_passes());
    // The kernels take tiles of at most tile_rows rows in sub-tiles, any height; a pass of global
    // rows (attn::pass_traits::key_split: few rows, every key) splits its keys over CTAs, which add
    // their parts of dQ like the other passes do.
    cuda_attention_tuning const tune = cuda_attention_tuning_for(0);
    pl.split_keys = std::max(tune.split_min_keys, (a.seq + cuda_max_splits - 1) / cuda_max_splits);
    for (int p = 0; p < pl.passes; ++p) {
      bool split = true;
      for (auto const& s : pl.heads) split = split && attn::traits_of(s, p).key_split;
      pl.splits.push_back(split ? (a.seq + pl.split_keys - 1) / pl.split_keys : 1);
    }
    return pl;
  }

  template <class Policy>
  static std::size_t workspace_bytes(context<cuda> const&, Policy const& policy, attention_backward_args<T> const& a) {
    check(a);
    attn::validate(policy, a.fwd.seq, a.fwd.heads, /*read_pointers=*/false);
    return workspace_size([&](workspace_carver& w) { carve(w, a.fwd); });
  }

  static constexpr int mma_smem_bytes(int d) {
    return (2 * 64 * d + 4 * cuda_attention_bn * d + 2 * 64 * cuda_attention_bn) * int(sizeof(T));
  }

  template <class Seg>
  static void launch(cuda_attention_bwd_params<T, Seg> const& prm, dim3 grid, cudaStream_t stream) {
    if constexpr (tensor_cores) {
      auto go = [&](auto kernel, int d) {
        int const smem = mma_smem_bytes(d);
        DRDIFF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        kernel<<<grid, 128, smem, stream>>>(prm);
      };
      if (prm.dim == 64) go(attention_bwd_mma_kernel<T, 64, Seg>, 64);
      else go(attention_bwd_mma_kernel<T, 128, Seg>, 128);
    } else {
      attention_bwd_simt_kernel<T, Seg><<<grid, 64, 2 * 16 * prm.dim * sizeof(float), stream>>>(prm);
    }
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }

  template <class Policy>
  static void run(context<cuda> const& ctx, Policy const& policy, attention_backward_args<T> const& a, void* workspace,
                  std::size_t workspace_size_given) {
    using Seg = seg_t<Policy>;
    check(a);
    auto const& f = a.fwd;
    attn::validate(policy, f.seq, f.heads, /*read_pointers=*/false);
    auto const pl = make_plan(policy, f);
    workspace_carver w(workspace);
    workspace_layout const ws = carve(w, f);
    DRDIFF_CHECK(workspace != nullptr, "attention_backward (cuda): a workspace of ", w.bytes(),
                 " bytes is needed (attention_backward_workspace_bytes)");
    DRDIFF_CHECK(workspace_size_given >= w.bytes(), "attention_backward (cuda): workspace_bytes = ",
                 workspace_size_given, " is smaller than the ", w.bytes(),
                 " bytes attention_backward_workspace_bytes() asks for");
    if (ctx.device >= 0) DRDIFF_CUDA_CHECK(cudaSetDevice(ctx.device));
    cudaStream_t const stream = cuda_stream(ctx);

    cuda_attention_bwd_params<T, Seg> call{};
    call.batch = f.batch; call.seq = f.seq; call.heads = f.heads; call.dim = f.head_dim;
    call.q = f.q; call.k = f.k; call.v = f.v; call.o = f.o; call.d_o = a.d_o;
    call.qs = f.q_strides; call.ks = f.k_strides; call.vs = f.v_strides; call.os = f.o_strides;
    call.dos = a.do_strides;
    call.lse = f.maybe_lse;
    call.d_lse = a.maybe_d_lse;
    call.kv_lens = f.maybe_kv_lens;
    call.scale_log2 = float(f.scale() * 1.4426950408889634);
    call.drow = ws.drow;
    call.dq_acc = ws.dq; call.dk_acc = ws.dk; call.dv_acc = ws.dv;
    call.table[0] = pl.heads[0];

    std::size_t const rows = std::size_t(f.batch) * f.heads * f.seq, elems = rows * std::size_t(f.head_dim);
    float* const accs[3] = {ws.dq, ws.dk, ws.dv};
    for (float* acc : accs) DRDIFF_CUDA_CHECK(cudaMemsetAsync(acc, 0, elems * sizeof(float), stream));
    attention_bwd_prep_kernel<T, Seg><<<cover_grid(rows, 8), 256, 0, stream>>>(call);
    DRDIFF_CUDA_CHECK(cudaGetLastError());

    int const group = pl.shared ? f.heads : cuda_table_heads;
    for (int h0 = 0; h0 < f.heads; h0 += group) {
      int const hn = std::min(group, f.heads - h0);
      auto prm = call;
      prm.head0 = h0;
      prm.heads_in_launch = hn;
      prm.table_size = pl.shared ? 1 : hn;
      for (int i = 0; i < prm.table_size; ++i) prm.table[i] = pl.heads[h0 + i];
      for (int p = 0; p < pl.passes; ++p) {
        int tiles = 0;
        for (int i = 0; i < hn; ++i) tiles = std::max(tiles, pl.heads[h0 + i].num_q_tiles(p));
        if (tiles == 0) continue;
        prm.pass = p;
        prm.split_keys = pl.splits[std::size_t(p)] > 1 ? pl.split_keys : 0;
        launch(prm, dim3(unsigned(tiles), unsigned(f.batch * hn), unsigned(pl.splits[std::size_t(p)])), stream);
      }
    }
    attention_bwd_finish_kernel<T><<<stride_grid(elems, 256, 8), 256, 0, stream>>>(
        ws.dq, ws.dk, ws.dv, a.dq, a.dk, a.dv, a.dq_strides, a.dk_strides, a.dv_strides, f.batch, f.seq, f.heads,
        f.head_dim, float(f.scale()));
    DRDIFF_CUDA_CHECK(cudaGetLastError());
#ifdef DRDIFF_DEBUG_SYNC
    DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
