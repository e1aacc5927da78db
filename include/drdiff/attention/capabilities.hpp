#pragma once
/// \file
/// What a segment policy may offer the backends beyond the contract: capabilities, asked for by the
/// kernels instead of the policy's type (the way FlashInfer's attention variants declare flags and
/// hooks). Every capability is optional and is a promise; a backend that ignores one computes the
/// same result, only slower. See docs/attention.md, "Capabilities".
///
/// A bound segment policy S declares them through one of these members:
///   pass_traits traits(int pass) const;   // the flags of pass `pass` (defaults for the hooks)
///   View pass_view(int pass) const;       // flags and hooks of pass `pass`, computed once (see below)
/// and, for a pass with pass_traits::key_tail:
///   template <class F> void tail_segment(int pass, index_range rows, F&& f) const;
/// A pass view is a small value (no pointers: kernels keep it in registers) that a kernel builds once
/// per query tile and asks, with the policy, per element:
///   pass_traits traits(S const&) const;
///   bool live_row(S const&, int i) const;        // false: row i of the pass's tiles has no key in it
///   bool owns_key(S const&, int i, int j) const; // owns(pass, i, j), for a live row i and a key j of
///                                                //   one of the pass's segments (may skip what the
///                                                //   segments ensure)
///   View tail() const;                           // the view of the key-tail pass riding with this one
/// attn::pass_view(seg, pass) gives the view of any segment policy: its own, or the general one (the
/// flags of traits(pass), if declared; live_row true, owns_key = owns).
///
/// Also here: whether two heads' bound policies are the same pattern (operator==, never a byte
/// comparison) and whether a policy is the same for every head.

#include <drdiff/attention/index_range.hpp>
#include <drdiff/core/config.hpp>
#include <drdiff/core/traits.hpp>

#include <type_traits>
#include <utility>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// What one pass of a bound segment policy lets a backend assume (all off: the general path). The
/// CUDA backend takes key_split and one_run only for passes whose tiles are at most its own tile
/// height (segments_of(policy, n, rows) asks for it; a policy may choose taller tiles), and one_run
/// only with band_lo = 0.
struct pass_traits {
  /// Every row of the pass's tiles attends every key [0, n), in exact segments (a dense pattern): the
  /// backend may use taller query tiles.
  bool dense = false;
  /// The pass's rows belong to no other pass and its tiles' segments are exact (global rows: few rows,
  /// every key): the backend may split a tile's keys across CTAs and merge the parts by log-sum-exp.
  bool key_split = false;
  /// Every row of the pass's tiles is also a row of a tile of pass − 1, and tail_segment(pass, rows, f)
  /// gives the pass's one segment for any rows of one such tile: the backend may append it to the keys
  /// of pass − 1's tiles (one launch and one round trip of the running state fewer).
  bool key_tail = false;
  /// Tiles are runs of consecutive rows, and a tile [r0, r1) sees the keys [r0 − band_hi, r1 − 1 +
  /// band_hi] ∩ [0, n) as one run, owned by the distance band (band_lo = 0): the backend finds, loads
  /// and masks them by arithmetic, with no segment list.
  bool one_run = false;
  /// A distance band: a live row i owns a key j of the pass's segments exactly when band_lo ≤ |i − j|
  /// ≤ band_hi (band_hi < 0: no band). The backend masks by distance instead of calling owns_key.
  int band_lo = 0, band_hi = -1;

  DRDIFF_HOST_DEVICE constexpr bool has_band() const noexcept { return band_hi >= 0; }
};

namespace detail {

template <class S, class = void>
struct has_pass_view_member : std::false_type {};
template <class S>
struct has_pass_view_member<S, drdiff::detail::void_t<decltype(std::declval<S const&>().pass_view(0))>>
    : std::true_type {};

template <class S, class = void>
struct has_traits_member : std::false_type {};
template <class S>
struct has_traits_member<S, drdiff::detail::void_t<decltype(pass_traits(std::declval<S const&>().traits(0)))>>
    : std::true_type {};

struct tail_probe {
  DRDIFF_HOST_DEVICE void operator()(index_range, bool) const noexcept {}
};
template <class S, class = void>
struct has_tail_segment : std::false_type {};
template <class S>
struct has_tail_segment<
    S, drdiff::detail::void_t<decltype(std::declval<S const&>().tail_segment(0, index_range{}, tail_probe{}))>>
    : std::true_type {};

template <class S, class = void>
struct has_equality : std::false_type {};
template <class S>
struct has_equality<S, drdiff::detail::void_t<decltype(bool(std::declval<S const&>() == std::declval<S const&>()))>>
    : std::true_type {};

}  // namespace detail

/// The pass view of a policy without a pass_view member: the flags of its traits(pass) when it has
/// that member (else none); every row live, owns_key = owns.
template <class S>
struct general_pass_view {
  int pass;
  DRDIFF_EXEC_CHECK_DISABLE
  DRDIFF_HOST_DEVICE constexpr pass_traits traits(S const& seg) const {
    if constexpr (detail::has_traits_member<S>::value) return seg.traits(pass);
    else return (void)seg, pass_traits{};
  }
  DRDIFF_HOST_DEVICE constexpr bool live_row(S const&, int) const noexcept { return true; }
  DRDIFF_EXEC_CHECK_DISABLE
  DRDIFF_HOST_DEVICE constexpr bool owns_key(S const& seg, int i, int j) const { return seg.owns(pass, i, j); }
  DRDIFF_HOST_DEVICE constexpr general_pass_view tail() const noexcept { return {pass + 1}; }
};

/// True when bound segment policy S declares capabilities (a pass view or traits).
template <class S>
inline constexpr bool has_capabilities_v =
    detail::has_pass_view_member<S>::value || detail::has_traits_member<S>::value;
/// True when S gives the segment of a key-tail pass for another pass's rows.
template <class S>
inline constexpr bool has_tail_segment_v = detail::has_tail_segment<S>::value;

/// The view of pass `pass` of bound segment policy `seg` (it keeps a pointer to seg).
DRDIFF_EXEC_CHECK_DISABLE
template <class S>
DRDIFF_HOST_DEVICE constexpr auto pass_view(S const& seg, int pass) {
  if constexpr (detail::has_pass_view_member<S>::value) return seg.pass_view(pass);
  else return (void)seg, general_pass_view<S>{pass};
}
/// The flags of pass `pass` (all off for a policy without capabilities).
DRDIFF_EXEC_CHECK_DISABLE
template <class S>
DRDIFF_HOST_DEVICE constexpr pass_traits traits_of(S const& seg, int pass) {
  return pass_view(seg, pass).traits(seg);
}

/// True when a and b, two heads' bound policies, are known to be the same pattern: `a == b` where the
/// type defines it, else false (a backend then keeps one pattern per head; never a byte comparison,
/// which would read padding).
template <class S>
constexpr bool same_pattern(S const& a, S const& b) {
  if constexpr (detail::has_equality<S>::value) return bool(a == b);
  else return (void)a, (void)b, false;
}

}  // namespace attn
DRDIFF_NAMESPACE_END
