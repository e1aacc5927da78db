#pragma once
/// \file
/// CPU backend of drdiff::attention_backward (Eigen). The forward's loop nest run backwards: the
/// same passes, query tiles and key segments (so every allowed pair is visited exactly once, and no
/// disallowed one), with P recomputed from the saved log-sum-exp. Each worker takes whole
/// (batch, head) items, so dK and dV are accumulated by one thread in a fixed order: the result is
/// deterministic, whatever the thread count, with no atomics and no per-thread copies of dK and dV.

#include <drdiff/attention/backward.hpp>
#include <drdiff/cpu/attention.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

template <class T>
struct cpu_attention_backward_layout {
  int threads = 1, tile = 0, chunk = 0, dim = 0;
  std::int64_t rows = 0;       // batch · heads · seq: D = rowsum(dO ∘ O)
  std::size_t per_thread = 0;  // elements of T
  static constexpr std::size_t align = 64;
  std::size_t bytes() const {
    return std::size_t(rows) * sizeof(T) + std::size_t(threads) * per_thread * sizeof(T) + 2 * align;
  }
};

template <class T>
struct attention_backward_impl<cpu, T, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, double>>> {
  using forward = attention_impl<cpu, T>;
  using row_matrix = typename forward::row_matrix;
  using const_map = typename forward::const_map;
  using map = typename forward::map;

  template <class Policy>
  static cpu_attention_backward_layout<T> layout(context<cpu> const& ctx, attention_backward_args<T> const& a) {
    cpu_attention_backward_layout<T> l;
    l.threads = resolve_threads(ctx.num_threads);
    l.tile = forward::template tile_rows_for<Policy>();
    l.chunk = cpu_attention_tuning::chunk_keys;
    l.dim = a.fwd.head_dim;
    l.rows = std::int64_t(a.fwd.batch) * a.fwd.heads * a.fwd.seq;
    // Q, dO and dQ tiles; S/P, dP and the mask; gathered K, V, dK, dV; the rows' lse and D.
    std::size_t const e = std::size_t(l.tile) * l.dim * 3 + std::size_t(l.tile) * l.chunk * 3 +
                          std::size_t(l.chunk) * l.dim * 4 + 2 * std::size_t(l.tile);
    l.per_thread = (e + 15) / 16 * 16;
    return l;
  }

  template <class Policy>
  static std::size_t workspace_bytes(context<cpu> const& ctx, Policy const&, attention_backward_args<T> const& a) {
    return layout<Policy>(ctx, a).bytes();
  }

  template <class Policy>
  static void run(context<cpu> const& ctx, Policy const& policy, attention_backward_args<T> const& a, void* workspace,
                  std::size_t workspace_size) {
    validate(a);
    auto const& f = a.fwd;
    attn::validate(policy, f.seq, f.heads);
    DRDIFF_CHECK(ctx.num_threads >= 0, "attention_backward: context<cpu>::num_threads = ", ctx.num_threads,
                 " must be >= 0");
    auto const lay = layout<Policy>(ctx, a);
    std::unique_ptr<unsigned char[]> owned;
    T* const d_all = reinterpret_cast<T*>(
        cpu_workspace(workspace, workspace_size, lay.bytes(), lay.align, "attention_backward", owned));
    T* const scratch = d_all + lay.rows;

    using bound = attn::bound_t<Policy>;
    std::vector<decltype(attn::segments_of(std::declval<bound const&>(), 0))> heads;
    heads.reserve(f.heads);
    for (int h = 0; h < f.heads; ++h) {
      auto const b = attn::bind(policy, f.seq, h);
      heads.push_back(attn::segments_of(b, f.seq, lay.tile));
    }

    int const N = f.seq, H = f.heads, D = f.head_dim;
    T const scale = T(f.scale());
    parallel_for(lay.threads, std::int64_t(f.batch) * H, [&](std::int64_t item, int worker) {
      int const b = int(item / H), h = int(item % H);
      // D = rowsum(dO ∘ O) − ∂L/∂lse (the lse's own gradient enters dS = P ∘ (dP − D) there); the
      // gradients start at zero.
      T* const drow = d_all + item * N;
      T const* const dlse = a.maybe_d_lse ? a.maybe_d_lse + item * N : nullptr;
      for (int i = 0; i < N; ++i) {
        T const* o = f.o + b * f.o_strides.batch + i * f.o_strides.seq + h * f.o_strides.head;
        T const* g = a.d_o + b * a.do_strides.batch + i * a.do_strides.seq + h * a.do_strides.head;
        T s = 0;
        for (int d = 0; d < D; ++d) s += g[d] * o[d];
        drow[i] = dlse ? s - dlse[i] : s;
        std::fill_n(a.dq + b * a.dq_strides.batch + i * a.dq_strides.seq + h * a.dq_strides.head, D, T(0));
        std::fill_n(a.dk + b * a.dk_strides.batch + i * a.dk_strides.seq + h * a.dk_strides.head, D, T(0));
        std::fill_n(a.dv + b * a.dv_strides.batch + i * a.dv_strides.seq + h * a.dv_strides.head, D, T(0));
      }
      auto const& seg = heads[h];
      T const* const lse = f.maybe_lse + item * N;
      T* const buf = scratch + std::size_t(worker) * lay.per_thread;
      for (int p = 0; p < seg.num_passes(); ++p)
        for (int t = 0; t < seg.num_q_tiles(p); ++t) {
          attn::index_range const rows = seg.q_tile(p, t);
          for (int r0 = 0; r0 < rows.count; r0 += lay.tile)
            run_rows(seg, p, t, rows.sub(r0, std::min(lay.tile, rows.count - r0)), a, b, h, scale, lay, lse, drow,
                     buf);
        }
    });
  }

  template <class Seg>
  static void run_rows(Seg const& seg, int p, int t, attn::index_range rows, attention_backward_args<T> const& a,
                       int b, int h, T scale, cpu_attention_backward_layout<T> const& lay, T const* lse_row,
                       T const* d_row, T* buf) {
    auto const& f = a.fwd;
    int const cnt = rows.count, D = f.head_dim, C = lay.chunk, TR = lay.tile;
    int const L = f.kv_len(b);
    T const neg_inf = -std::numeric_limits<T>::infinity();

    map q(buf, cnt, D, Eigen::OuterStride<>(D));
    map g(buf + std::size_t(TR) * D, cnt, D, Eigen::OuterStride<>(D));
    map dq(buf + std::size_t(TR) * D * 2, cnt, D, Eigen::OuterStride<>(D));
    T* const s_ptr = buf + std::size_t(TR) * D * 3;
    T* const dp_ptr = s_ptr + std::size_t(TR) * C;
    T* const mask_ptr = dp_ptr + std::size_t(TR) * C;
    T* const k_buf = mask_ptr + std::size_t(TR) * C;
    T* const v_buf = k_buf + std::size_t(C) * D;
    T* const dk_buf = v_buf + std::size_t(C) * D;
    T* const dv_buf = dk_buf + std::size_t(C) * D;
    T* const lse = dv_buf + std::size_t(C) * D;
    T* const drow = lse + TR;

    T const* const qb = f.q + b * f.q_strides.batch + h * f.q_strides.head;
    T const* const kb = f.k + b * f.k_strides.batch + h * f.k_strides.head;
    T const* const vb = f.v + b * f.v_strides.batch + h * f.v_strides.head;
    T const* const gb = a.d_o + b * a.do_strides.batch + h * a.do_strides.head;
    T* const dqb = a.dq + b * a.dq_strides.batch + h * a.dq_strides.head;
    T* const dkb = a.dk + b * a.dk_strides.batch + h * a.dk_strides.head;
    T* const dvb = a.dv + b * a.dv_strides.batch + h * a.dv_strides.head;

    for (int r = 0; r < cnt; ++r) {
      int const i = rows[r];
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic> const> qs(qb + i * f.q_strides.seq, D);
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic> const> gs(gb + i * a.do_strides.seq, D);
      q.row(r) = qs * scale;  // as in the forward: S = (scale·Q)·Kᵀ
      g.row(r) = gs;
      lse[r] = lse_row[i];
      drow[r] = d_row[i];
    }
    dq.setZero();

    seg.for_each_segment(p, t, [&](attn::index_range keys, bool exact) {
      int const valid = keys.count_below(L);
      for (int c0 = 0; c0 < valid; c0 += C) {
        int const kc = std::min(C, valid - c0);
        attn::index_range const kr = keys.sub(c0, kc);
        T const *k_ptr, *v_ptr;
        T *dk_ptr, *dv_ptr;
        std::int64_t k_stride, v_stride, dk_stride, dv_stride;
        if (!kr.list) {
          k_ptr = kb + kr.start * f.k_strides.seq;
          v_ptr = vb + kr.start * f.v_strides.seq;
          dk_ptr = dkb + kr.start * a.dk_strides.seq;
          dv_ptr = dvb + kr.start * a.dv_strides.seq;
          k_stride = f.k_strides.seq * kr.stride;
          v_stride = f.v_strides.seq * kr.stride;
          dk_stride = a.dk_strides.seq * kr.stride;
          dv_stride = a.dv_strides.seq * kr.stride;
        } else {  // a key list: gathered, and the key gradients scattered back below
          for (int c = 0; c < kc; ++c) {
            std::copy_n(kb + kr[c] * f.k_strides.seq, D, k_buf + std::size_t(c) * D);
            std::copy_n(vb + kr[c] * f.v_strides.seq, D, v_buf + std::size_t(c) * D);
          }
          std::fill_n(dk_buf, std::size_t(kc) * D, T(0));
          std::fill_n(dv_buf, std::size_t(kc) * D, T(0));
          k_ptr = k_buf;
          v_ptr = v_buf;
          dk_ptr = dk_buf;
          dv_ptr = dv_buf;
          k_stride = v_stride = dk_stride = dv_stride = D;
        }
        const_map kt(k_ptr, kc, D, Eigen::OuterStride<>(k_stride));
        const_map vt(v_ptr, kc, D, Eigen::OuterStride<>(v_stride));
        map dkt(dk_ptr, kc, D, Eigen::OuterStride<>(dk_stride));
        map dvt(dv_ptr, kc, D, Eigen::OuterStride<>(dv_stride));
        map s(s_ptr, cnt, kc, Eigen::OuterStride<>(C));
        map dp(dp_ptr, cnt, kc, Eigen::OuterStride<>(C));
        map keep(mask_ptr, cnt, kc, Eigen::OuterStride<>(C));
        s.noalias() = q * kt.transpose();
        for (int r = 0; r < cnt; ++r) {
          auto srow = s.row(r).array();
          if (!exact) {
            int const i = rows[r];
            if constexpr (attn::detail::has_row_mask<Seg, T>::value) {
              seg.row_mask(p, i, kr, &keep(r, 0));
            } else {
              for (int c = 0; c < kc; ++c) keep(r, c) = seg.owns(p, i, kr[c]) ? T(1) : T(0);
            }
          }
          // P = exp(S − lse). A row with no allowed key (lse = −∞) gets none of these pairs, but a
          // NaN lse (a NaN reached the row in the forward) must reach its gradients.
          if (lse[r] == neg_inf) {
            srow.setZero();
          } else if (exact) {
            srow = (srow - lse[r]).exp();
          } else {  // masked before exp: a masked score far above lse must not overflow to ∞·0
            srow = (keep.row(r).array() > T(0)).select(srow - lse[r], neg_inf).exp();
          }
        }
        dvt.noalias() += s.transpose() * g;   // dV += Pᵀ·dO
        dp.noalias() = g * vt.transpose();    // dP = dO·Vᵀ
        for (int r = 0; r < cnt; ++r)          // dS = P ∘ (dP − D)
          dp.row(r).array() = s.row(r).array() * (dp.row(r).array() - drow[r]);
        dq.noalias() += dp * kt;              // dQ += dS·K (· scale below)
        dkt.noalias() += dp.transpose() * q;  // dK += dSᵀ·(scale·Q)
        if (kr.list)
          for (int c = 0; c < kc; ++c) {
            T* dk_row = dkb + kr[c] * a.dk_strides.seq;
            T* dv_row = dvb + kr[c] * a.dv_strides.seq;
            for (int d = 0; d < D; ++d) {
              dk_row[d] += dk_buf[std::size_t(c) * D + d];
              dv_row[d] += dv_buf[std::size_t(c) * D + d];
            }
          }
      }
    });

    for (int r = 0; r < cnt; ++r) {  // a row may be visited by several passes: accumulate
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> out(dqb + rows[r] * a.dq_strides.seq, D);
      out += dq.row(r) * scale;
    }
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
