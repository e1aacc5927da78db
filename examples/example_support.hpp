#pragma once
// Small helpers shared by the examples: random tensors, timing, error against the reference.

#include <drdiff/drdiff.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <random>
#include <vector>

namespace example {

struct tensors {
  std::vector<float> q, k, v, o, lse, o_ref, lse_ref;
  drdiff::attention_args<float> args, ref_args;
  tensors(int batch, int n, int heads, int dim, unsigned seed) {
    std::size_t const elems = std::size_t(batch) * n * heads * dim;
    q.resize(elems); k.resize(elems); v.resize(elems); o.resize(elems); o_ref.resize(elems);
    lse.resize(std::size_t(batch) * heads * n); lse_ref.resize(lse.size());
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = nd(rng);
    args = drdiff::make_attention_args(q.data(), k.data(), v.data(), o.data(), batch, n, heads, dim);
    args.maybe_lse = lse.data();
    ref_args = args;
    ref_args.o = o_ref.data();
    ref_args.maybe_lse = lse_ref.data();
  }
  /// Max |O − O_ref| / max |O_ref| over rows [r0, r1) of every head (batch 0).
  double rel_error(int r0, int r1) const {
    double diff = 0, ref = 0;
    std::size_t const row = std::size_t(args.heads) * args.head_dim;
    for (std::size_t e = r0 * row; e < r1 * row; ++e) {
      diff = std::max(diff, double(std::abs(o[e] - o_ref[e])));
      ref = std::max(ref, double(std::abs(o_ref[e])));
    }
    return diff / std::max(ref, 1e-30);
  }
};

/// Median wall time of `reps` calls of f, in seconds.
template <class F>
double median_seconds(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto const start = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace example
