#pragma once
/// \file
/// attn::block_segments — presents a block-path-only policy through the segment interface, so the
/// backends run one loop nest for every policy: one pass, query tiles of block_q rows, one segment
/// per visited key block (exact when full_block says so).

#include <drdiff/attention/concepts.hpp>
#include <drdiff/attention/index_range.hpp>

#include <utility>

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
  /// One wrapper per head is the same as another when the policies compare equal (when P has ==).
  template <class Q = P, class = decltype(bool(std::declval<Q const&>() == std::declval<Q const&>()))>
  friend constexpr bool operator==(block_segments const& a, block_segments const& b) {
    return a.n == b.n && bool(a.policy == b.policy);
  }
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

/// The segment view of a bound policy: its segment path in query tiles of `tile_rows` rows when it
/// lets the backend choose the tile height (`tiles(rows)`, as attn::pattern does), itself when it has
/// segments of its own, else a block_segments wrapper. `tile_rows` is the backend's choice; policies
/// with their own tiles ignore it.
template <class B>
DRDIFF_HOST_DEVICE constexpr auto segments_of(B const& bound, int n, int tile_rows = 64) {
  if constexpr (detail::has_tiles<B>::value) return (void)n, bound.tiles(tile_rows);
  else if constexpr (detail::has_segments<B>::value) return (void)n, (void)tile_rows, bound;
  else return (void)tile_rows, block_segments<B>{bound, n};
}

}  // namespace attn
DRDIFF_NAMESPACE_END
