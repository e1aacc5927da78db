#pragma once
/// \file
/// drdiff::attention_reference — the oracle: for each query row, every key is tested with the
/// policy's `mask`, scores and outputs are accumulated in double, one score row at a time (O(N)
/// memory per thread, no N×N buffer). Slow by design (O(N²) mask evaluations); `row_begin` /
/// `row_end` restrict it to a range of query rows so long sequences can be spot-checked.

#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/cpu/detail/parallel.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

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
    T const* q = a.q + b * a.q_strides.batch + i * a.q_strides.seq + h * a.q_strides.head;
    std::vector<double>& s = scores[w];
    double mx = -std::numeric_limits<double>::infinity();
    for (int j = 0; j < L; ++j) {
      if (!bound.mask(i, j)) {
        s[j] = -std::numeric_limits<double>::infinity();
        continue;
      }
      T const* k = a.k + b * a.k_strides.batch + j * a.k_strides.seq + h * a.k_strides.head;
      double dot = 0;
      for (int d = 0; d < D; ++d) dot += double(q[d]) * double(k[d]);
      s[j] = dot * scale;
      mx = std::max(mx, s[j]);
    }
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

DRDIFF_NAMESPACE_END
