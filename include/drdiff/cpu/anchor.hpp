#pragma once
/// \file
/// CPU side of the semantic anchor states: the soft absorbing forward process, the projectors
/// (Eigen GEMMs, std::thread workers over token chunks), rounding to the nearest embedding, and the
/// blend / re-anchoring kernels behind anchor::guidance and anchor::keep_clean.

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/anchor/guidance.hpp>
#include <drdiff/anchor/projectors.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/cpu/detail/linear.hpp>
#include <drdiff/cpu/detail/parallel.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {
template <class T>
using anchor_row_matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <class T>
void anchor_check_real(char const* who) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "drdiff::anchor (cpu): element types are float or double");
  (void)who;
}
inline void anchor_check_distinct(void const* x, void const* out, char const* who) {
  DRDIFF_CHECK(x != nullptr, who, ": x is a null pointer");
  DRDIFF_CHECK(out != nullptr, who, ": out is a null pointer");
  DRDIFF_CHECK(x != out, who, ": out must not be x (this projector does not work in place)");
}
/// Token rows per work item of the rounding GEMM, and vocabulary columns per score block.
inline constexpr int anchor_round_rows = 64;
inline constexpr int anchor_round_cols = 2048;
}  // namespace detail

namespace anchor {


// ---- soft absorbing state ------------------------------------------------------------------------

/// x_t from x_0 for every sequence of the batch (see anchor/absorbing.hpp). x0 and xt may be equal.
template <class T>
void absorb(context<cpu> const& ctx, soft_absorbing const& s, absorb_args<T> const& a) {
  drdiff::detail::anchor_check_real<T>("absorb");
  a.validate(s);
  auto const noise = detail::absorb_noise(s, a.stream);
  std::int64_t const tokens = a.shape.tokens();
  int const d = a.shape.dim;
  std::int64_t const chunk = 256;
  drdiff::detail::parallel_for(drdiff::detail::resolve_threads(ctx.num_threads), (tokens + chunk - 1) / chunk,
                               [&](std::int64_t c, int) {
    for (std::int64_t tok = c * chunk; tok < std::min(tokens, (c + 1) * chunk); ++tok) {
      double const ab = a.alpha_bar[tok / a.shape.seq];
      bool const target = a.maybe_target == nullptr || a.maybe_target[tok] != 0;
      bool const rep = target && detail::absorbed(s, a.stream, std::uint64_t(tok), ab);
      for (int k = 0; k < d; ++k) {
        std::size_t const i = std::size_t(tok) * d + k;
        double const eps = (target && !rep) ? noise(0, i) : 0.0;
        a.xt[i] = T(detail::absorb_value(double(a.x0[i]), a.maybe_m ? double(a.maybe_m[k]) : 0.0, ab, target, rep,
                                         eps));
      }
    }
  });
}

// ---- projectors ----------------------------------------------------------------------------------

/// Scratch bytes `project` / `round_to_nearest` need on the CPU (0 = none); pass nullptr to let the
/// call allocate it.
template <class T>
std::size_t workspace_bytes(context<cpu> const& ctx, nearest_embedding<T> const& p, token_shape const&) {
  std::size_t const threads = std::size_t(drdiff::detail::resolve_threads(ctx.num_threads));
  return sizeof(T) *
         (std::size_t(p.vocab) + threads * drdiff::detail::anchor_round_rows * drdiff::detail::anchor_round_cols);
}
template <class P>
std::size_t workspace_bytes(context<cpu> const&, P const&, token_shape const&) {
  static_assert(is_projector_v<P>, "drdiff::anchor::workspace_bytes: P is not an anchor projector");
  return 0;
}

/// Rounding: ids[token] = the best table row for each token; also writes that row to maybe_out.
template <class T>
void round_to_nearest(context<cpu> const& ctx, nearest_embedding<T> const& p, token_shape const& shape, T const* x,
                      int* ids, T* maybe_out = nullptr, void* workspace = nullptr, std::size_t bytes = 0) {
  drdiff::detail::anchor_check_real<T>("round_to_nearest");
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr, "round_to_nearest: x is a null pointer");
  DRDIFF_CHECK(ids != nullptr, "round_to_nearest: ids is a null pointer");
  DRDIFF_CHECK(maybe_out != x, "round_to_nearest: out must not be x");
  std::size_t const need = workspace_bytes(ctx, p, shape);
  std::vector<T> own;
  if (workspace == nullptr) {
    own.resize(need / sizeof(T));
    workspace = own.data();
  } else {
    DRDIFF_CHECK(bytes >= need, "round_to_nearest: workspace of ", bytes, " bytes is smaller than the ", need,
                 " bytes it needs");
  }
  int const V = p.vocab, d = shape.dim;
  int const threads = drdiff::detail::resolve_threads(ctx.num_threads);
  T* const bias = static_cast<T*>(workspace);  // −½‖E_v‖² (l2) or 0 (dot)
  T* const scores = bias + V;
  Eigen::Map<drdiff::detail::anchor_row_matrix<T> const> E(p.table, V, d);
  if (p.score == metric::l2) {
    drdiff::detail::parallel_for(threads, (V + 4095) / 4096, [&](std::int64_t c, int) {
      for (int v = int(c) * 4096; v < std::min<int>(V, int(c + 1) * 4096); ++v) bias[v] = T(-0.5) * E.row(v).squaredNorm();
    });
  } else {
    std::fill(bias, bias + V, T(0));
  }
  std::int64_t const tokens = shape.tokens();
  std::int64_t const chunks = (tokens + drdiff::detail::anchor_round_rows - 1) / drdiff::detail::anchor_round_rows;
  drdiff::detail::parallel_for(threads, chunks, [&](std::int64_t c, int worker) {
    std::int64_t const t0 = c * drdiff::detail::anchor_round_rows;
    int const rows = int(std::min<std::int64_t>(drdiff::detail::anchor_round_rows, tokens - t0));
    Eigen::Map<drdiff::detail::anchor_row_matrix<T> const> X(x + t0 * d, rows, d);
    Eigen::Map<drdiff::detail::anchor_row_matrix<T>> S(
        scores + std::size_t(worker) * drdiff::detail::anchor_round_rows * drdiff::detail::anchor_round_cols, rows,
        drdiff::detail::anchor_round_cols);
    T best[drdiff::detail::anchor_round_rows];
    int arg[drdiff::detail::anchor_round_rows];
    std::fill(best, best + rows, -std::numeric_limits<T>::infinity());
    std::fill(arg, arg + rows, 0);
    for (int v0 = 0; v0 < V; v0 += drdiff::detail::anchor_round_cols) {
      int const cols = std::min(drdiff::detail::anchor_round_cols, V - v0);
      auto s = S.leftCols(cols);
      s.noalias() = X * E.middleRows(v0, cols).transpose();
      for (int r = 0; r < rows; ++r) {
        T const* row = s.data() + std::size_t(r) * drdiff::detail::anchor_round_cols;
        for (int j = 0; j < cols; ++j) {
          T const v = row[j] + bias[v0 + j];
          if (v > best[r]) {  // strict: ties keep the smaller id
            best[r] = v;
            arg[r] = v0 + j;
          }
        }
      }
    }
    for (int r = 0; r < rows; ++r) {
      DRDIFF_CHECK(std::isfinite(double(best[r])), "round_to_nearest: token ", t0 + r,
                   " has no finite score (NaN or infinite input)");
      ids[t0 + r] = arg[r];
      if (maybe_out) std::copy(p.table + std::size_t(arg[r]) * d, p.table + std::size_t(arg[r] + 1) * d,
                               maybe_out + (t0 + r) * d);
    }
  });
}

template <class T>
void project(context<cpu> const&, identity const& p, token_shape const& shape, T const* x, T* out, void* = nullptr,
             std::size_t = 0) {
  p.validate(shape);
  DRDIFF_CHECK(x != nullptr && out != nullptr, "identity: x or out is a null pointer");
  if (x != out) std::copy(x, x + shape.elements(), out);
}

template <class T>
void project(context<cpu> const& ctx, nearest_embedding<T> const& p, token_shape const& shape, T const* x, T* out,
             void* workspace = nullptr, std::size_t bytes = 0) {
  drdiff::detail::anchor_check_distinct(x, out, "nearest_embedding");
  std::vector<int> ids(std::size_t(shape.tokens()));
  round_to_nearest(ctx, p, shape, x, ids.data(), out, workspace, bytes);
}

template <class T>
void project(context<cpu> const& ctx, segment_pool<T> const& p, token_shape const& shape, T const* x, T* out,
             void* = nullptr, std::size_t = 0) {
  drdiff::detail::anchor_check_real<T>("segment_pool");
  p.validate(shape);
  drdiff::detail::anchor_check_distinct(x, out, "segment_pool");
  int const d = shape.dim, per_seq = p.segments(shape.seq);
  using vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
  drdiff::detail::parallel_for(drdiff::detail::resolve_threads(ctx.num_threads),
                               std::int64_t(shape.batch) * per_seq, [&](std::int64_t item, int) {
    int const b = int(item / per_seq), g = int(item % per_seq);
    int const i0 = g * p.length, i1 = std::min(shape.seq, i0 + p.length);
    std::size_t const base = (std::size_t(b) * shape.seq) * d;
    Eigen::Map<drdiff::detail::anchor_row_matrix<T> const> X(x + base + std::size_t(i0) * d, i1 - i0, d);
    vec mean = X.colwise().sum().transpose() / T(i1 - i0);
    if (p.rank > 0) {
      Eigen::Map<drdiff::detail::anchor_row_matrix<T> const> down(p.maybe_down, p.rank, d), up(p.maybe_up, d, p.rank);
      vec const z = down * mean;
      mean = up * z;
    }
    for (int i = i0; i < i1; ++i) Eigen::Map<vec>(out + base + std::size_t(i) * d, d) = mean;
  });
}

template <class T>
void project(context<cpu> const& ctx, linear<T> const& p, token_shape const& shape, T const* x, T* out, void* = nullptr,
             std::size_t = 0) {
  drdiff::detail::anchor_check_real<T>("linear");
  p.validate(shape);
  drdiff::detail::anchor_check_distinct(x, out, "linear");
  drdiff::detail::linear_rows(ctx, x, shape.tokens(), shape.dim, p.weight, shape.dim, p.maybe_bias, out, false);
}

/// A projector bound to its context, shape and scratch: callable as project(x, out).
template <class P, class T>
struct cpu_projector {
  context<cpu> ctx{};
  P p{};
  token_shape shape{};
  void* workspace = nullptr;
  std::size_t bytes = 0;
  void operator()(T const* x, T* out) const { project(ctx, p, shape, x, out, workspace, bytes); }
};
/// bind<T>(ctx, projector, shape[, workspace, bytes]).
template <class T, class P>
cpu_projector<P, T> bind(context<cpu> const& ctx, P const& p, token_shape const& shape, void* workspace = nullptr,
                         std::size_t bytes = 0) {
  static_assert(is_projector_v<P>, "drdiff::anchor::bind: P is not an anchor projector");
  p.validate(shape);
  return {ctx, p, shape, workspace, bytes};
}

}  // namespace anchor

namespace detail {
template <>
struct anchor_blend_impl<cpu> {
  template <class T>
  static void run(context<cpu> const& ctx, T* x0, T const* p, double gamma, std::size_t n) {
    std::int64_t const chunk = 1 << 16;
    T const g = T(gamma);
    drdiff::detail::parallel_for(drdiff::detail::resolve_threads(ctx.num_threads),
                                 (std::int64_t(n) + chunk - 1) / chunk, [&](std::int64_t c, int) {
      std::size_t const i0 = std::size_t(c) * chunk, i1 = std::min(n, i0 + chunk);
      for (std::size_t i = i0; i < i1; ++i) x0[i] += g * (p[i] - x0[i]);
    });
  }
};
template <>
struct anchor_keep_impl<cpu> {
  template <class T>
  static void run(context<cpu> const&, T* x, T const* clean, unsigned char const* target, anchor::token_shape const& s) {
    std::int64_t const tokens = s.tokens();
    for (std::int64_t t = 0; t < tokens; ++t)
      if (target[t] == 0) std::copy(clean + t * s.dim, clean + (t + 1) * s.dim, x + t * s.dim);
  }
};
}  // namespace detail

DRDIFF_NAMESPACE_END
