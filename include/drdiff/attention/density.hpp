#pragma once
/// \file
/// Counting the pairs a policy allows, from its segment enumeration (never an N×N scan of the
/// mask): the "useful work" of benchmarks (useful FLOPs = 4·D·pairs) and the density of a pattern.

#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/concepts.hpp>

#include <cstdint>
#include <optional>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Number of (query, key) pairs policy `p` allows at sequence length n, summed over `heads` heads
/// (heads differ under per-head dilation), with keys below `kv_len` (n when negative).
template <class P>
std::int64_t allowed_pairs(P const& p, int n, int heads = 1, int kv_len = -1) {
  if (kv_len < 0) kv_len = n;
  validate(p, n, heads);
  using seg_t = decltype(segments_of(bind(p, n, 0), n));
  std::int64_t total = 0, first_head = 0;
  std::vector<std::int32_t> keep;
  std::optional<seg_t> first;  // head 0's bound pattern
  for (int h = 0; h < heads; ++h) {
    seg_t const seg = segments_of(bind(p, n, h), n);
    if (h > 0 && (head_independent_v<P> || same_pattern(seg, *first))) {  // the same pattern as head 0
      total += first_head;
      continue;
    }
    std::int64_t count = 0;
    for (int pass = 0; pass < seg.num_passes(); ++pass)
      for (int t = 0; t < seg.num_q_tiles(pass); ++t) {
        index_range const rows = seg.q_tile(pass, t);
        if (rows.empty()) continue;
        seg.for_each_segment(pass, t, [&](index_range keys, bool exact) {
          int const valid = keys.count_below(kv_len);
          if (exact) {
            count += std::int64_t(valid) * rows.count;
            return;
          }
          index_range const kr = keys.first(valid);
          for (int r = 0; r < rows.count; ++r) {
            if constexpr (detail::has_row_mask<seg_t, std::int32_t>::value) {
              keep.resize(std::size_t(valid));
              seg.row_mask(pass, rows[r], kr, keep.data());
              for (int c = 0; c < valid; ++c) count += keep[c];
            } else {
              for (int c = 0; c < valid; ++c) count += seg.owns(pass, rows[r], kr[c]) ? 1 : 0;
            }
          }
        });
      }
    if (h == 0) {
      first_head = count;
      first = seg;
    }
    total += count;
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
