#pragma once
/// \file
/// attn::block_segments — presents a block-path-only policy through the segment interface, so the
/// backends run one loop nest for every policy: one pass, query tiles of block_q rows, one segment
/// per visited key block (exact when full_block says so).

#include <drdiff/attention/concepts.hpp>
#include <drdiff/attention/index_range.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

template <class P>
struct block_segments {
  P policy;
  int n = 0;

  DRDIFF_HOST_DEVICE constexpr int num_passes() const noexcept { return 1; }
  DRDIFF_HOST_DEVICE constexpr int num_q_tiles(int) const noexcept { return (n + P::block_q - 1) / P::block_q; }
  DRDIFF_HOST_DEVICE constexpr index_range q_tile(int, int t) const noexcept {
    int const q0 = t * P::block_q, q1 = q0 + P::block_q < n ? q0 + P::block_q : n;
    return contiguous(q0, q1);
  }
  DRDIFF_EXEC_CHECK_DISABLE
  DRDIFF_HOST_DEVICE constexpr bool owns(int, int i, int j) const noexcept { return policy.mask(i, j); }
  DRDIFF_EXEC_CHECK_DISABLE
  template <class F>
  DRDIFF_HOST_DEVICE constexpr void for_each_segment(int, int t, F&& f) const {
    int const nb = policy.num_kv_blocks(t);
    bool const full_rows = (t + 1) * P::block_q <= n;
    for (int i = 0; i < nb; ++i) {
      int const kb = policy.kv_block(t, i);
      int const k0 = kb * P::block_k, k1 = k0 + P::block_k < n ? k0 + P::block_k : n;
      if (k0 >= k1) continue;
      f(contiguous(k0, k1), full_rows && k1 - k0 == P::block_k && policy.full_block(t, kb));
    }
  }
};

/// The segment view of a bound policy: itself when it has segments, else a block_segments wrapper.
template <class B>
DRDIFF_HOST_DEVICE constexpr auto segments_of(B const& bound, int n) {
  if constexpr (detail::has_segments<B>::value) return bound;
  else return block_segments<B>{bound, n};
}

}  // namespace attn
DRDIFF_NAMESPACE_END
