#pragma once
/// \file
/// Counting the pairs a policy allows, from its segment enumeration (never an N×N scan of the
/// mask): the "useful work" of benchmarks (useful FLOPs = 4·D·pairs) and the density of a pattern.

#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/concepts.hpp>

#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Number of (query, key) pairs policy `p` allows at sequence length n, summed over `heads` heads
/// (heads differ under per-head dilation), with keys below `kv_len` (n when negative).
template <class P>
std::int64_t allowed_pairs(P const& p, int n, int heads = 1, int kv_len = -1) {
  if (kv_len < 0) kv_len = n;
  validate(p, n, heads);
  std::int64_t total = 0;
  for (int h = 0; h < heads; ++h) {
    auto const seg = segments_of(bind(p, n, h), n);
    for (int pass = 0; pass < seg.num_passes(); ++pass)
      for (int t = 0; t < seg.num_q_tiles(pass); ++t) {
        index_range const rows = seg.q_tile(pass, t);
        if (rows.empty()) continue;
        seg.for_each_segment(pass, t, [&](index_range keys, bool exact) {
          int const valid = keys.count_below(kv_len);
          if (exact) {
            total += std::int64_t(valid) * rows.count;
            return;
          }
          for (int c = 0; c < valid; ++c)
            for (int r = 0; r < rows.count; ++r) total += seg.owns(pass, rows[r], keys[c]) ? 1 : 0;
        });
      }
  }
  return total;
}

/// Fraction of the n² pairs (per head) that are allowed.
template <class P>
double density(P const& p, int n, int heads = 1) {
  return double(allowed_pairs(p, n, heads)) / (double(n) * double(n) * heads);
}

}  // namespace attn
DRDIFF_NAMESPACE_END
