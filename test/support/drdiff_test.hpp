#pragma once
// Shared helpers of the tests: random problems, comparison against the reference.

#include <drdiff/drdiff.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

namespace drdiff::test {

/// A fresh random seed per run (printed by the caller on failure through Catch's INFO).
inline std::uint64_t fresh_seed() {
  static std::random_device rd;
  return (std::uint64_t(rd()) << 32) ^ rd();
}

/// Q, K, V, O and lse for a [batch, seq, heads, dim] problem, packed or with padded strides.
template <class T>
struct problem {
  int batch, seq, heads, dim;
  std::int64_t pad;  // extra elements between rows (exercises explicit strides)
  std::vector<T> q, k, v, o, lse;
  std::vector<int> kv_lens;

  problem(int b, int n, int h, int d, std::uint64_t seed, int row_pad = 0)
      : batch(b), seq(n), heads(h), dim(d), pad(row_pad) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> nd(0.0, 1.0);
    std::size_t const elems = std::size_t(b) * n * stride_seq();
    q.resize(elems); k.resize(elems); v.resize(elems);
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = T(nd(rng));
    o.assign(elems, std::numeric_limits<T>::quiet_NaN());  // poisoned: unwritten outputs show up
    lse.assign(std::size_t(b) * h * n, std::numeric_limits<T>::quiet_NaN());
  }
  std::int64_t stride_seq() const { return std::int64_t(heads) * dim + pad; }
  tensor_strides strides() const { return {std::int64_t(seq) * stride_seq(), stride_seq(), dim}; }

  attention_args<T> args() {
    attention_args<T> a{};
    a.batch = batch; a.seq = seq; a.heads = heads; a.head_dim = dim;
    a.q = q.data(); a.k = k.data(); a.v = v.data(); a.o = o.data();
    a.q_strides = a.k_strides = a.v_strides = a.o_strides = strides();
    a.maybe_lse = lse.data();
    a.maybe_kv_lens = kv_lens.empty() ? nullptr : kv_lens.data();
    return a;
  }
  /// Output buffers for a second run (the reference), poisoned too.
  attention_args<T> args_into(std::vector<T>& o2, std::vector<T>& lse2) {
    o2.assign(o.size(), std::numeric_limits<T>::quiet_NaN());
    lse2.assign(lse.size(), std::numeric_limits<T>::quiet_NaN());
    auto a = args();
    a.o = o2.data();
    a.maybe_lse = lse2.data();
    return a;
  }
};

/// Largest relative error of the outputs of rows [r0, r1): max |x − y| / max(max|y|, tiny) per
/// (batch, head) block, NaN counted as infinite; lse compared with absolute tolerance in
/// `lse_err`.
template <class T>
double max_rel_error(problem<T> const& p, std::vector<T> const& o_ref, std::vector<T> const& lse_ref, int r0,
                     int r1, double* lse_err) {
  double worst = 0, worst_lse = 0;
  for (int b = 0; b < p.batch; ++b)
    for (int h = 0; h < p.heads; ++h) {
      double diff = 0, ref = 0;
      for (int i = r0; i < r1; ++i) {
        std::size_t const base = std::size_t(b) * p.seq * p.stride_seq() + std::size_t(i) * p.stride_seq() +
                                 std::size_t(h) * p.dim;
        for (int d = 0; d < p.dim; ++d) {
          double const x = p.o[base + d], y = o_ref[base + d];
          if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<double>::infinity();
          diff = std::max(diff, std::abs(x - y));
          ref = std::max(ref, std::abs(y));
        }
        std::size_t const li = (std::size_t(b) * p.heads + h) * p.seq + i;
        double const x = p.lse[li], y = lse_ref[li];
        if (std::isnan(x) || std::isnan(y)) return std::numeric_limits<double>::infinity();
        if (!(std::isinf(x) && std::isinf(y) && (x < 0) == (y < 0)))
          worst_lse = std::max(worst_lse, std::abs(x - y) / std::max(1.0, std::abs(y)));
      }
      worst = std::max(worst, diff / std::max(ref, 1e-30));
    }
  if (lse_err) *lse_err = worst_lse;
  return worst;
}

}  // namespace drdiff::test
