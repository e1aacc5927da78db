#pragma once
// Shared set-up of the CPU benchmarks: a random [1, N, H, D] problem and its useful work.

#include <drdiff/drdiff.hpp>

#include <cstdint>
#include <random>
#include <vector>

namespace drdiff::bench {

template <class T>
struct problem {
  std::vector<T> q, k, v, o, lse;
  attention_args<T> args;
  problem(int batch, int n, int heads, int dim, std::uint64_t seed = 1) {
    std::size_t const elems = std::size_t(batch) * n * heads * dim;
    q.resize(elems); k.resize(elems); v.resize(elems); o.resize(elems);
    lse.resize(std::size_t(batch) * heads * n);
    std::mt19937_64 rng(seed);
    std::normal_distribution<T> nd(0, 1);
    for (auto* t : {&q, &k, &v})
      for (auto& x : *t) x = nd(rng);
    args = make_attention_args(q.data(), k.data(), v.data(), o.data(), batch, n, heads, dim);
    args.maybe_lse = lse.data();
  }
};

/// Useful FLOPs of one call: 4·D per allowed (query, key) pair (Q·Kᵀ and P·V), all heads and batches.
template <class Policy>
double useful_flops(Policy const& p, int batch, int n, int heads, int dim) {
  return 4.0 * dim * double(attn::allowed_pairs(p, n, heads)) * batch;
}

}  // namespace drdiff::bench
