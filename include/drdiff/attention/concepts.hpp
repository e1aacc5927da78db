#pragma once
/// \file
/// The attention-policy contract, checked at compile time (C++17 detection; a C++20 concept when
/// available). See docs/attention.md, "Writing a new policy".
///
/// A *bound* policy — what kernels run — is small, trivially copyable, and provides:
///   static constexpr int block_q, block_k;
///   bool mask(int q, int k) const;                 // the definition
///   int  num_kv_blocks(int qb) const;              // key blocks visited by query block qb,
///   int  kv_block(int qb, int i) const;            //   in increasing order
///   bool full_block(int qb, int kb) const;         // hint: every pair of the block pair allowed
/// and optionally the segment path (preferred by the backends when present):
///   int  num_passes() const;  int num_q_tiles(int pass) const;  index_range q_tile(int pass, int t) const;
///   template <class F> void for_each_segment(int pass, int t, F&& f) const;   // f(index_range, bool exact)
///   bool owns(int pass, int q, int k) const;
///   template <class T> void row_mask(int pass, int q, index_range keys, T* keep) const;  // optional:
///                                                  // owns() for a row of keys at once, as 1/0
/// A bound policy may instead let the backend choose its query-tile height: `tiles(int rows)` returns
/// its segment path in tiles of that many rows (attn::pattern → attn::tiled_pattern; segments_of).
/// A segment policy may also declare capabilities that let backends take faster paths (distance
/// bands, key splits, key tails, one run of keys per tile): attention/capabilities.hpp.
/// A policy whose pattern depends on the sequence length or the head has `bind(int n, int head)`
/// returning the bound policy, and may have `void validate(int n, int heads) const` (throws
/// drdiff::error on bad parameters).

#include <drdiff/attention/index_range.hpp>
#include <drdiff/core/config.hpp>
#include <drdiff/core/traits.hpp>

#include <type_traits>
#include <utility>

#if DRDIFF_HAS_CONCEPTS
#include <concepts>
#endif

DRDIFF_NAMESPACE_BEGIN
namespace attn {
namespace detail {

template <class P, class = void>
struct has_bind : std::false_type {};
template <class P>
struct has_bind<P, drdiff::detail::void_t<decltype(std::declval<P const&>().bind(0, 0))>> : std::true_type {};

template <class P, class = void>
struct has_validate : std::false_type {};
template <class P>
struct has_validate<P, drdiff::detail::void_t<decltype(std::declval<P const&>().validate(0, 0))>>
    : std::true_type {};

template <class P, class = void>
struct has_validate3 : std::false_type {};
template <class P>
struct has_validate3<P, drdiff::detail::void_t<decltype(std::declval<P const&>().validate(0, 0, true))>>
    : std::true_type {};

template <class P, class = void>
struct is_block_policy : std::false_type {};
template <class P>
struct is_block_policy<
    P, drdiff::detail::void_t<decltype(P::block_q), decltype(P::block_k),
                              decltype(bool(std::declval<P const&>().mask(0, 0))),
                              decltype(bool(std::declval<P const&>().full_block(0, 0))),
                              decltype(int(std::declval<P const&>().num_kv_blocks(0))),
                              decltype(int(std::declval<P const&>().kv_block(0, 0)))>>
    : std::bool_constant<std::is_trivially_copyable_v<P>> {};

struct segment_probe {
  DRDIFF_HOST_DEVICE void operator()(index_range, bool) const noexcept {}
};
template <class P, class = void>
struct has_segments : std::false_type {};
template <class P>
struct has_segments<
    P, drdiff::detail::void_t<decltype(int(std::declval<P const&>().num_passes())),
                              decltype(int(std::declval<P const&>().num_q_tiles(0))),
                              decltype(index_range(std::declval<P const&>().q_tile(0, 0))),
                              decltype(bool(std::declval<P const&>().owns(0, 0, 0))),
                              decltype(std::declval<P const&>().for_each_segment(0, 0, segment_probe{}))>>
    : std::true_type {};

/// A bound policy that lets the backend pick the query-tile height: `tiles(int rows)` returns its
/// segment path (attn::pattern).
template <class P, class = void>
struct has_tiles : std::false_type {};
template <class P>
struct has_tiles<P, drdiff::detail::void_t<decltype(std::declval<P const&>().tiles(0))>> : std::true_type {};

template <class P, class T, class = void>
struct has_row_mask : std::false_type {};
template <class P, class T>
struct has_row_mask<P, T, drdiff::detail::void_t<decltype(std::declval<P const&>().row_mask(0, 0, index_range{},
                                                                                           static_cast<T*>(nullptr)))>>
    : std::true_type {};

}  // namespace detail

/// Bind a policy to sequence length n and head `head` (identity for policies without `bind`).
DRDIFF_EXEC_CHECK_DISABLE
template <class P>
DRDIFF_HOST_DEVICE constexpr auto bind(P const& p, int n, int head) {
  if constexpr (detail::has_bind<P>::value) return p.bind(n, head);
  else return p;
}
/// The type kernels run for policy P.
template <class P>
using bound_t = std::decay_t<decltype(bind(std::declval<P const&>(), 0, 0))>;

/// Check a policy's parameters for sequence length n and `heads` heads; throws drdiff::error.
/// `read_pointers` = false when the memory a policy points to (a global list) is on the device.
template <class P>
void validate(P const& p, int n, int heads, bool read_pointers = true) {
  if constexpr (detail::has_validate3<P>::value) p.validate(n, heads, read_pointers);
  else if constexpr (detail::has_validate<P>::value) p.validate(n, heads);
}

/// True when P (once bound) satisfies the block-path contract.
template <class P>
inline constexpr bool is_policy_v = detail::is_block_policy<bound_t<P>>::value;
/// True when P (once bound) also describes its keys as strided segments.
template <class P>
inline constexpr bool has_segments_v =
    detail::has_segments<bound_t<P>>::value || detail::has_tiles<bound_t<P>>::value;
/// True when P is known to bind to the same policy for every head: it has no bind(n, head). (Other
/// policies share one bound pattern between heads when their bound patterns compare equal:
/// attn::same_pattern.)
template <class P>
inline constexpr bool head_independent_v = !detail::has_bind<P>::value;

#if DRDIFF_HAS_CONCEPTS
/// C++20 spelling of the contract.
template <class P>
concept policy = is_policy_v<P>;
#endif

}  // namespace attn
DRDIFF_NAMESPACE_END
