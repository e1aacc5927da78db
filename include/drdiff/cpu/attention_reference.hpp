#pragma once
/// \file
/// drdiff::attention_reference — the oracle: for each query row, every key is tested with the
/// policy's `mask`, scores and outputs are accumulated in double, one score row at a time (O(N)
/// memory per thread, no N×N buffer). Slow by design (O(N²) mask evaluations); `row_begin` /
/// `row_end` restrict it to a range of query rows so long sequences can be spot-checked.
/// drdiff::attention_backward_reference is the gradients' oracle, in the same manner.

#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/backward.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/cpu/detail/parallel.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

namespace detail {
/// s[j] for keys j < kv_len(b): query row i's scaled scores against them in double, −∞ where the
/// mask says no; returns their max (−∞ when no key is allowed).
template <class Bound, class T>
double reference_scores(Bound const& bound, attention_args<T> const& a, int b, int h, int i, double scale,
                        std::vector<double>& s) {
  T const* q = a.q + b * a.q_strides.batch + i * a.q_strides.seq + h * a.q_strides.head;
  double mx = -std::numeric_limits<double>::infinity();
  for (int j = 0; j < a.kv_len(b); ++j) {
    s[j] = -std::numeric_limits<double>::infinity();
    if (!bound.mask(i, j)) continue;
    T const* k = a.k + b * a.k_strides.batch + j * a.k_strides.seq + h * a.k_strides.head;
    double dot = 0;
    for (int d = 0; d < a.head_dim; ++d) dot += double(q[d]) * double(k[d]);
    s[j] = dot * scale;
    mx = std::max(mx, s[j]);
  }
  return mx;
}
}  // namespace detail

/// Writes O (and lse when given) for query rows [row_begin, row_end) of every (batch, head);
/// row_end < 0 means seq. Same semantics as drdiff::attention: rows with no allowed key get 0 and
/// lse = −inf.
template <class Policy, class T>
void attention_reference(Policy const& policy, attention_args<T> const& a, int row_begin = 0, int row_end = -1,
                         int num_threads = 0) {
  detail::check_policy<Policy>();
  validate(a);
  attn::validate(policy, a.seq, a.heads);
  if (row_end < 0) row_end = a.seq;
  DRDIFF_CHECK(row_begin >= 0 && row_begin <= row_end && row_end <= a.seq, "attention_reference: rows [",
               row_begin, ", ", row_end, ") are outside [0, seq = ", a.seq, "]");
  int const rows = row_end - row_begin, H = a.heads, D = a.head_dim;
  if (rows == 0) return;
  int const threads = detail::resolve_threads(num_threads);
  double const scale = a.scale();
  std::vector<std::vector<double>> scores(threads, std::vector<double>(a.seq)), out(threads, std::vector<double>(D));
  std::int64_t const items = std::int64_t(a.batch) * H * rows;
  detail::parallel_for(threads, items, [&](std::int64_t item, int w) {
    int const b = int(item / (std::int64_t(H) * rows));
    int const h = int(item / rows % H);
    int const i = row_begin + int(item % rows);
    auto const bound = attn::bind(policy, a.seq, h);
    int const L = a.kv_len(b);
    std::vector<double>& s = scores[w];
    double const mx = detail::reference_scores(bound, a, b, h, i, scale, s);
    std::vector<double>& acc = out[w];
    std::fill(acc.begin(), acc.end(), 0.0);
    double sum = 0;
    if (mx != -std::numeric_limits<double>::infinity()) {
      for (int j = 0; j < L; ++j) {
        if (s[j] == -std::numeric_limits<double>::infinity()) continue;
        double const p = std::exp(s[j] - mx);
        sum += p;
        T const* v = a.v + b * a.v_strides.batch + j * a.v_strides.seq + h * a.v_strides.head;
        for (int d = 0; d < D; ++d) acc[d] += p * double(v[d]);
      }
    }
    T* o = a.o + b * a.o_strides.batch + i * a.o_strides.seq + h * a.o_strides.head;
    for (int d = 0; d < D; ++d) o[d] = sum > 0 ? T(acc[d] / sum) : T(0);
    if (a.maybe_lse)
      a.maybe_lse[(std::int64_t(b) * H + h) * a.seq + i] =
          sum > 0 ? T(mx + std::log(sum)) : -std::numeric_limits<T>::infinity();
  });
}

/// The gradients' oracle: dQ, dK and dV of attention with `policy`, in double, from q, k, v and dO
/// alone (the softmax recomputed from the mask; args.fwd.o and the lse are not read). One (batch,
/// head) per worker; O(N·D) memory per worker. Rows with no allowed key contribute nothing.
template <class Policy, class T>
void attention_backward_reference(Policy const& policy, attention_backward_args<T> const& a, int num_threads = 0) {
  detail::check_policy<Policy>();
  auto const& f = a.fwd;
  validate(f);
  attn::validate(policy, f.seq, f.heads);
  DRDIFF_CHECK(a.d_o && a.dq && a.dk && a.dv, "attention_backward_reference: d_o, dq, dk and dv must be set");
  int const N = f.seq, H = f.heads, D = f.head_dim;
  double const scale = f.scale();
  double const neg_inf = -std::numeric_limits<double>::infinity();
  detail::parallel_for(detail::resolve_threads(num_threads), std::int64_t(f.batch) * H, [&](std::int64_t item, int) {
    int const b = int(item / H), h = int(item % H);
    auto const bound = attn::bind(policy, N, h);
    int const L = f.kv_len(b);
    auto at = [&](T const* base, tensor_strides const& st, int i) { return base + b * st.batch + i * st.seq + h * st.head; };
    std::vector<double> dk(std::size_t(N) * D, 0.0), dv(std::size_t(N) * D, 0.0), s(N), dp(N), dq(D);
    for (int i = 0; i < N; ++i) {
      T const* q = at(f.q, f.q_strides, i);
      T const* g = at(a.d_o, a.do_strides, i);
      double const mx = detail::reference_scores(bound, f, b, h, i, scale, s);
      std::fill(dq.begin(), dq.end(), 0.0);
      if (mx != neg_inf) {
        double sum = 0;
        for (int j = 0; j < L; ++j)
          if (s[j] != neg_inf) sum += std::exp(s[j] - mx);
        // D = Σ_j P_ij dP_ij = rowsum(dO ∘ O), less ∂L/∂lse_i when the loss uses the lse
        double dsum = a.maybe_d_lse ? -double(a.maybe_d_lse[item * N + i]) : 0.0;
        for (int j = 0; j < L; ++j) {
          if (s[j] == neg_inf) continue;
          s[j] = std::exp(s[j] - mx) / sum;  // now P_ij
          T const* v = at(f.v, f.v_strides, j);
          double x = 0;
          for (int d = 0; d < D; ++d) x += double(g[d]) * double(v[d]);
          dp[j] = x;
          dsum += s[j] * x;
        }
        for (int j = 0; j < L; ++j) {
          if (s[j] == neg_inf) continue;
          double const ds = s[j] * (dp[j] - dsum);
          T const* k = at(f.k, f.k_strides, j);
          for (int d = 0; d < D; ++d) {
            dq[d] += scale * ds * double(k[d]);
            dk[std::size_t(j) * D + d] += scale * ds * double(q[d]);
            dv[std::size_t(j) * D + d] += s[j] * double(g[d]);
          }
        }
      }
      T* out = a.dq + b * a.dq_strides.batch + i * a.dq_strides.seq + h * a.dq_strides.head;
      for (int d = 0; d < D; ++d) out[d] = T(dq[d]);
    }
    for (int j = 0; j < N; ++j) {
      T* ko = a.dk + b * a.dk_strides.batch + j * a.dk_strides.seq + h * a.dk_strides.head;
      T* vo = a.dv + b * a.dv_strides.batch + j * a.dv_strides.seq + h * a.dv_strides.head;
      for (int d = 0; d < D; ++d) {
        ko[d] = T(dk[std::size_t(j) * D + d]);
        vo[d] = T(dv[std::size_t(j) * D + d]);
      }
    }
  });
}

DRDIFF_NAMESPACE_END
