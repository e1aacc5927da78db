#pragma once
/// \file
/// attn::sparse_union — any union of dense, local window, dilated and global-token patterns,
/// with one softmax over the union (each allowed key counted once). Built with `a | b`.

#include <drdiff/attention/pattern.hpp>
#include <drdiff/core/config.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/core/traits.hpp>

#include <type_traits>
#include <utility>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// How a policy chooses its global tokens (unbound: the count may depend on N).
struct global_spec {
  global_rule rule = global_rule::none;
  int count = 0;      ///< G for `first` / `strided`; list length for `list`
  int sqrt_cap = 0;   ///< > 0: G = min(⌈√N⌉, sqrt_cap) instead of `count`
  int const* list = nullptr;

  /// G for sequence length n.
  DRDIFF_HOST_DEVICE constexpr int resolve(int n) const noexcept {
    if (rule == global_rule::none) return 0;
    if (sqrt_cap > 0 && rule != global_rule::list) {
      int lo = 0, hi = 46341;  // ⌈√n⌉ by bisection: the least r with r² ≥ n (46341² > INT_MAX)
      while (lo < hi) {
        int const mid = lo + (hi - lo) / 2;
        if (static_cast<long long>(mid) * mid < n) lo = mid + 1; else hi = mid;
      }
      return lo < sqrt_cap ? lo : sqrt_cap;
    }
    return count;
  }
  DRDIFF_HOST_DEVICE constexpr bool operator==(global_spec const& o) const noexcept {
    return rule == o.rule && count == o.count && sqrt_cap == o.sqrt_cap && list == o.list;
  }
};

namespace detail {
/// Checks a global spec for sequence length n; `who` names the policy in messages. The list's
/// entries are read only when `read_list` (false when the list lives in device memory).
inline void validate_globals(global_spec const& g, int n, char const* who, bool read_list) {
  if (g.rule == global_rule::none) return;
  int const cnt = g.resolve(n);
  DRDIFF_CHECK(g.count >= 0, who, ": global token count G = ", g.count, " must be >= 0");
  DRDIFF_CHECK(g.sqrt_cap >= 0, who, ": the cap of G = ceil(sqrt(N)) is ", g.sqrt_cap, " (must be >= 0)");
  DRDIFF_CHECK(g.sqrt_cap == 0 || g.rule != global_rule::list, who,
               ": an explicit list has its own length; sqrt_cap = ", g.sqrt_cap, " is not allowed with it");
  DRDIFF_CHECK(cnt <= n, who, ": global token count G = ", cnt, " exceeds the sequence length N = ", n);
  if (g.rule == global_rule::list) {
    DRDIFF_CHECK(g.list != nullptr || cnt == 0, who, ": global token list is null but G = ", cnt);
    if (!read_list) return;
    for (int i = 0; i < cnt; ++i) {
      DRDIFF_CHECK(g.list[i] >= 0 && g.list[i] < n, who, ": global token list[", i, "] = ", g.list[i],
                   " is outside [0, N = ", n, ")");
      DRDIFF_CHECK(i == 0 || g.list[i] > g.list[i - 1], who, ": global token list must be strictly increasing,"
                   " but list[", i - 1, "] = ", g.list[i - 1], " and list[", i, "] = ", g.list[i]);
    }
  }
}
}  // namespace detail

/// The union of any built-in patterns, unbound. Trivially copyable; per-head rate arrays and the
/// global list are borrowed pointers.
struct sparse_union {
  bool dense = false;
  bool has_window = false;
  int window = 0;   ///< local half-width w (when has_window)
  int num_dilations = 0;
  dilation dil[max_dilations] = {};
  int const* head_rates[max_dilations] = {};  ///< optional per-head rate per component (size: heads)
  global_spec globals{};

  /// The pattern for sequence length n and head `head`. Call validate(n, heads) first.
  DRDIFF_HOST_DEVICE constexpr pattern bind(int n, int head) const noexcept {
    pattern p{};
    p.n = n;
    p.is_dense = dense;
    if (dense) return p;
    // Distances never exceed n − 1, so windows, spans and rates are clamped to n without changing
    // the mask; this keeps every index computation of the pattern inside int.
    auto clamp = [n](int x) { return x < n ? x : n; };
    p.window = has_window ? clamp(window) : -1;
    p.num_dilations = num_dilations;
    for (int c = 0; c < num_dilations; ++c) {
      p.dil[c].span = clamp(dil[c].span);
      p.dil[c].rate = clamp(head_rates[c] ? head_rates[c][head] : dil[c].rate);
    }
    int const g = globals.resolve(n);
    if (g > 0) {
      p.rule = globals.rule;
      p.num_global = g;
      p.global_stride = globals.rule == global_rule::strided ? n / g : 1;
      p.global_list = globals.list;
    }
    return p;
  }

  /// Throws drdiff::error naming the parameter when the union is not valid for (n, heads).
  /// Per-head rate arrays are always read (they are host memory: binding happens on the host); the
  /// global list only when `read_pointers` (the CUDA backend passes false: its list is on the device).
  void validate(int n, int heads, bool read_pointers = true) const {
    DRDIFF_CHECK(n > 0, "attention policy: sequence length N = ", n, " must be > 0");
    DRDIFF_CHECK(!has_window || window >= 0, "local_window: half-width w = ", window, " must be >= 0");
    DRDIFF_CHECK(num_dilations >= 0 && num_dilations <= max_dilations, "sparse_union: ", num_dilations,
                 " dilated components (at most ", max_dilations, ")");
    for (int c = 0; c < num_dilations; ++c) {
      DRDIFF_CHECK(head_rates[c] || dil[c].rate >= 1, "dilated: rate delta = ", dil[c].rate, " must be >= 1");
      DRDIFF_CHECK(dil[c].span >= 0, "dilated: span s = ", dil[c].span, " must be >= 0");
      DRDIFF_CHECK(!has_window || dil[c].span >= window, "sparse_union: dilated span s = ", dil[c].span,
                   " is smaller than the local window w = ", window, " (s must be >= w)");
      if (head_rates[c]) {
        for (int h = 0; h < heads; ++h)
          DRDIFF_CHECK(head_rates[c][h] >= 1, "dilated: per-head rate delta[", h, "] = ", head_rates[c][h],
                       " must be >= 1");
      }
    }
    detail::validate_globals(globals, n, "global_tokens", read_pointers);
  }
};

namespace detail {
template <class T, class = void>
struct has_to_union : std::false_type {};
template <class T>
struct has_to_union<T, drdiff::detail::void_t<decltype(std::declval<T const&>().to_union())>> : std::true_type {};

DRDIFF_HOST_DEVICE constexpr sparse_union const& as_union(sparse_union const& u) noexcept { return u; }
template <class T, std::enable_if_t<has_to_union<T>::value, int> = 0>
DRDIFF_HOST_DEVICE constexpr sparse_union as_union(T const& t) noexcept { return t.to_union(); }
}  // namespace detail

/// True for the built-in pattern types that combine with `|`.
template <class T>
inline constexpr bool is_pattern_v = std::is_same_v<T, sparse_union> || detail::has_to_union<T>::value;

/// The union of two patterns. Windows merge to the wider one; dilated components are kept side by
/// side (at most max_dilations); two different global-token sets are rejected (use one list).
template <class A, class B, std::enable_if_t<is_pattern_v<A> && is_pattern_v<B>, int> = 0>
sparse_union operator|(A const& a_in, B const& b_in) {
  sparse_union const a = detail::as_union(a_in), b = detail::as_union(b_in);
  sparse_union u = a;
  u.dense = a.dense || b.dense;
  u.has_window = a.has_window || b.has_window;
  u.window = !b.has_window ? a.window : (!a.has_window ? b.window : (a.window > b.window ? a.window : b.window));
  DRDIFF_CHECK(a.num_dilations + b.num_dilations <= max_dilations, "operator|: the union would hold ",
               a.num_dilations + b.num_dilations, " dilated components (at most ", max_dilations, ")");
  for (int c = 0; c < b.num_dilations; ++c) {
    u.dil[u.num_dilations] = b.dil[c];
    u.head_rates[u.num_dilations] = b.head_rates[c];
    ++u.num_dilations;
  }
  if (b.globals.rule != global_rule::none) {
    DRDIFF_CHECK(a.globals.rule == global_rule::none || a.globals == b.globals,
                 "operator|: both operands have global tokens, with different rules or counts; "
                 "express the union of the two sets as one explicit list");
    u.globals = b.globals;
  }
  return u;
}

}  // namespace attn
DRDIFF_NAMESPACE_END
