#pragma once
/// \file
/// CPU backend of drdiff::attention (Eigen): blocked, flash-style online softmax over only the
/// allowed keys. Work is split into passes (see attn::pattern); within a pass, threads take
/// (batch, head, query tile) items; each item gathers its query rows once, walks its key segments in
/// chunks of `chunk_keys`, and keeps the running (max, sum, output) of every row. Dilated segments
/// are read as dense tiles through an Eigen::Map whose outer stride is δ rows, without copying.

#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/cpu/detail/parallel.hpp>

#include <Eigen/Core>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Tuning of the CPU kernel.
struct cpu_attention_tuning {
  static constexpr int tile_rows = 64;    ///< query rows per tile (segment-path policies)
  static constexpr int chunk_keys = 256;  ///< keys per S = Q·Kᵀ product
};

/// The caller's workspace, checked against `need` bytes, or (when it is null) one held by `owned`;
/// returns its first byte aligned to `align`. `who` names the call and its size query in the error.
inline unsigned char* cpu_workspace(void* workspace, std::size_t size, std::size_t need, std::size_t align,
                                    char const* who, std::unique_ptr<unsigned char[]>& owned) {
  if (!workspace) {
    owned.reset(new unsigned char[need]);
    workspace = owned.get();
  } else {
    DRDIFF_CHECK(size >= need, who, ": workspace_bytes = ", size, " is smaller than the ", need, " bytes ", who,
                 "_workspace_bytes() asks for");
  }
  auto addr = reinterpret_cast<std::uintptr_t>(workspace);
  return reinterpret_cast<unsigned char*>((addr + align - 1) / align * align);
}

template <class T>
struct cpu_attention_layout {
  int threads = 1, tile = 0, chunk = 0, dim = 0;
  std::int64_t rows = 0;  // batch · heads · seq
  std::size_t per_thread = 0;  // elements of T
  static constexpr std::size_t align = 64;

  std::size_t state_elems() const { return static_cast<std::size_t>(rows); }
  std::size_t bytes() const {
    std::size_t const state = 2 * state_elems() * sizeof(T);
    return state + std::size_t(threads) * per_thread * sizeof(T) + 2 * align;
  }
};

template <class T>
struct attention_impl<cpu, T, std::enable_if_t<std::is_same_v<T, float> || std::is_same_v<T, double>>> {
  using tuning = cpu_attention_tuning;
  using row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  using const_map = Eigen::Map<row_matrix const, Eigen::Unaligned, Eigen::OuterStride<>>;
  using map = Eigen::Map<row_matrix, Eigen::Unaligned, Eigen::OuterStride<>>;

  template <class Policy>
  static int tile_rows_for() {
    using B = attn::bound_t<Policy>;
    if constexpr (attn::has_segments_v<Policy>) return tuning::tile_rows;
    else return B::block_q;
  }

  template <class Policy>
  static cpu_attention_layout<T> layout(context<cpu> const& ctx, attention_args<T> const& a) {
    cpu_attention_layout<T> l;
    l.threads = resolve_threads(ctx.num_threads);
    l.tile = tile_rows_for<Policy>();
    l.chunk = tuning::chunk_keys;
    l.dim = a.head_dim;
    l.rows = std::int64_t(a.batch) * a.heads * a.seq;
    // Q tile, output accumulator, S/P, mask, gathered K and V, per-row max and sum; rounded to 16.
    std::size_t const e = std::size_t(l.tile) * l.dim * 2 + std::size_t(l.tile) * l.chunk * 2 +
                          std::size_t(l.chunk) * l.dim * 2 + 2 * std::size_t(l.tile);
    l.per_thread = (e + 15) / 16 * 16;
    return l;
  }

  template <class Policy>
  static std::size_t workspace_bytes(context<cpu> const& ctx, Policy const&, attention_args<T> const& a) {
    return layout<Policy>(ctx, a).bytes();
  }

  template <class Policy>
  static void run(context<cpu> const& ctx, Policy const& policy, attention_args<T> const& a, void* workspace,
                  std::size_t workspace_size) {
    validate(a);
    attn::validate(policy, a.seq, a.heads);
    DRDIFF_CHECK(ctx.num_threads >= 0, "attention: context<cpu>::num_threads = ", ctx.num_threads,
                 " must be >= 0");
    auto const lay = layout<Policy>(ctx, a);
    std::unique_ptr<unsigned char[]> owned;
    T* const m_all =
        reinterpret_cast<T*>(cpu_workspace(workspace, workspace_size, lay.bytes(), lay.align, "attention", owned));
    T* const l_all = m_all + lay.state_elems();
    T* const scratch = l_all + lay.state_elems();

    using bound = attn::bound_t<Policy>;
    std::vector<decltype(attn::segments_of(std::declval<bound const&>(), 0))> heads;
    heads.reserve(a.heads);
    int max_passes = 0;
    for (int h = 0; h < a.heads; ++h) {
      auto const b = attn::bind(policy, a.seq, h);
      heads.push_back(attn::segments_of(b, a.seq, lay.tile));
      max_passes = std::max(max_passes, heads.back().num_passes());
    }

    int const N = a.seq, H = a.heads, D = a.head_dim;
    std::int64_t const bh = std::int64_t(a.batch) * H;
    T const neg_inf = -std::numeric_limits<T>::infinity();

    // Initialise the running state: m = −inf, ℓ = 0, O = 0.
    parallel_for(lay.threads, bh, [&](std::int64_t item, int) {
      int const b = int(item / H), h = int(item % H);
      std::fill(m_all + item * N, m_all + (item + 1) * N, neg_inf);
      std::fill(l_all + item * N, l_all + (item + 1) * N, T(0));
      for (int i = 0; i < N; ++i) {
        T* o = a.o + b * a.o_strides.batch + i * a.o_strides.seq + h * a.o_strides.head;
        std::fill(o, o + D, T(0));
      }
    });

    T const scale = T(a.scale());
    for (int p = 0; p < max_passes; ++p) {
      // Items of this pass: (batch, head, tile), heads may differ in tile count (per-head dilation).
      std::vector<std::int64_t> first(H + 1, 0);
      for (int h = 0; h < H; ++h)
        first[h + 1] = first[h] + (p < heads[h].num_passes() ? heads[h].num_q_tiles(p) : 0);
      std::int64_t const per_batch = first[H];
      parallel_for(lay.threads, per_batch * a.batch, [&](std::int64_t item, int worker) {
        int const b = int(item / per_batch);
        std::int64_t const r = item % per_batch;
        int h = 0;
        while (first[h + 1] <= r) ++h;
        int const t = int(r - first[h]);
        run_tile(heads[h], p, t, a, b, h, scale, lay, m_all + (b * H + h) * std::int64_t(N),
                 l_all + (b * H + h) * std::int64_t(N), scratch + std::size_t(worker) * lay.per_thread);
      });
    }

    // Finalise: O /= ℓ, lse = m + log ℓ.
    parallel_for(lay.threads, bh, [&](std::int64_t item, int) {
      int const b = int(item / H), h = int(item % H);
      T const* m = m_all + item * N;
      T const* l = l_all + item * N;
      for (int i = 0; i < N; ++i) {
        T* o = a.o + b * a.o_strides.batch + i * a.o_strides.seq + h * a.o_strides.head;
        // ℓ = 0: no allowed key (output 0, lse −∞); ℓ NaN: a NaN reached the row, and stays.
        bool const nan = std::isnan(l[i]) || std::isnan(m[i]);
        T const inv = nan ? l[i] + m[i] : l[i] > T(0) ? T(1) / l[i] : T(0);
        for (int d = 0; d < D; ++d) o[d] *= inv;
        if (a.maybe_lse) a.maybe_lse[item * N + i] = nan ? inv : l[i] > T(0) ? m[i] + std::log(l[i]) : neg_inf;
      }
    });
  }

  template <class Seg>
  static void run_tile(Seg const& seg, int p, int t, attention_args<T> const& a, int b, int h, T scale,
                       cpu_attention_layout<T> const& lay, T* m_row, T* l_row, T* buf) {
    attn::index_range const rows = seg.q_tile(p, t);
    // A policy may hand out taller tiles than the scratch holds: run them in slices of `tile` rows
    // (the tile's segments stay valid, and exact, for any subset of its rows).
    for (int r0 = 0; r0 < rows.count; r0 += lay.tile)
      run_rows(seg, p, t, rows.sub(r0, std::min(lay.tile, rows.count - r0)), a, b, h, scale, lay, m_row, l_row, buf);
  }

  template <class Seg>
  static void run_rows(Seg const& seg, int p, int t, attn::index_range rows, attention_args<T> const& a, int b,
                       int h, T scale, cpu_attention_layout<T> const& lay, T* m_row, T* l_row, T* buf) {
    int const cnt = rows.count, D = a.head_dim, C = lay.chunk, TR = lay.tile;
    int const L = a.kv_len(b);
    T const neg_inf = -std::numeric_limits<T>::infinity();

    map q(buf, cnt, D, Eigen::OuterStride<>(D));
    map acc(buf + std::size_t(TR) * D, cnt, D, Eigen::OuterStride<>(D));
    T* const s_ptr = buf + std::size_t(TR) * D * 2;
    T* const mask_ptr = s_ptr + std::size_t(TR) * C;
    T* const k_buf = mask_ptr + std::size_t(TR) * C;
    T* const v_buf = k_buf + std::size_t(C) * D;
    T* const m = v_buf + std::size_t(C) * D;
    T* const l = m + TR;

    T const* const qb = a.q + b * a.q_strides.batch + h * a.q_strides.head;
    T const* const kb = a.k + b * a.k_strides.batch + h * a.k_strides.head;
    T const* const vb = a.v + b * a.v_strides.batch + h * a.v_strides.head;
    T* const ob = a.o + b * a.o_strides.batch + h * a.o_strides.head;

    for (int r = 0; r < cnt; ++r) {
      int const i = rows[r];
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic> const> src(qb + i * a.q_strides.seq, D);
      q.row(r) = src * scale;
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic> const> o(ob + i * a.o_strides.seq, D);
      acc.row(r) = o;
      m[r] = m_row[i];
      l[r] = l_row[i];
    }

    seg.for_each_segment(p, t, [&](attn::index_range keys, bool exact) {
      int const valid = keys.count_below(L);
      for (int c0 = 0; c0 < valid; c0 += C) {
        int const kc = std::min(C, valid - c0);
        attn::index_range const kr = keys.sub(c0, kc);
        T const* k_ptr;
        T const* v_ptr;
        std::int64_t k_stride, v_stride;
        if (!kr.list) {
          k_ptr = kb + kr.start * a.k_strides.seq;
          v_ptr = vb + kr.start * a.v_strides.seq;
          k_stride = a.k_strides.seq * kr.stride;
          v_stride = a.v_strides.seq * kr.stride;
        } else {
          for (int c = 0; c < kc; ++c) {
            std::copy_n(kb + kr[c] * a.k_strides.seq, D, k_buf + std::size_t(c) * D);
            std::copy_n(vb + kr[c] * a.v_strides.seq, D, v_buf + std::size_t(c) * D);
          }
          k_ptr = k_buf;
          v_ptr = v_buf;
          k_stride = v_stride = D;
        }
        const_map kt(k_ptr, kc, D, Eigen::OuterStride<>(k_stride));
        const_map vt(v_ptr, kc, D, Eigen::OuterStride<>(v_stride));
        map s(s_ptr, cnt, kc, Eigen::OuterStride<>(C));
        s.noalias() = q * kt.transpose();  // (cnt, kc)

        map keep(mask_ptr, cnt, kc, Eigen::OuterStride<>(C));
        if (!exact) {
          for (int r = 0; r < cnt; ++r) {
            int const i = rows[r];
            if constexpr (attn::detail::has_row_mask<Seg, T>::value) {
              seg.row_mask(p, i, kr, &keep(r, 0));
            } else {
              for (int c = 0; c < kc; ++c) keep(r, c) = seg.owns(p, i, kr[c]) ? T(1) : T(0);
            }
            s.row(r) = (keep.row(r).array() > T(0)).select(s.row(r), neg_inf);
          }
        }
        for (int r = 0; r < cnt; ++r) {
          auto srow = s.row(r).array();
          // A NaN score (a NaN in q or in an attended key) makes the row's max NaN, and with it the
          // row's output and lse: it must not pass for a row with no allowed key (m = −∞).
          T const mx = srow.template maxCoeff<Eigen::PropagateNaN>();
          T const m_new = std::isnan(mx) || std::isnan(m[r]) ? std::numeric_limits<T>::quiet_NaN() : std::max(m[r], mx);
          if (m_new == neg_inf) {
            srow.setZero();
            continue;
          }
          srow = (srow - m_new).exp();
          if (!exact) srow *= keep.row(r).array();  // masked keys contribute exactly 0
          T const alpha = m[r] == neg_inf ? T(0) : std::exp(m[r] - m_new);
          l[r] = l[r] * alpha + srow.sum();
          if (alpha != T(1)) acc.row(r) *= alpha;
          m[r] = m_new;
        }
        acc.noalias() += s * vt;  // (cnt, D)
      }
    });

    for (int r = 0; r < cnt; ++r) {
      int const i = rows[r];
      Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic>> o(ob + i * a.o_strides.seq, D);
      o = acc.row(r);
      m_row[i] = m[r];
      l_row[i] = l[r];
    }
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
