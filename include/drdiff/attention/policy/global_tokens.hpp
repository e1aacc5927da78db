#pragma once
/// \file
/// attn::global_tokens — G global tokens: a global query attends every key and every query
/// attends the global keys.

#include <drdiff/attention/policy/union.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Global tokens chosen as the first G positions, G evenly strided positions (k·⌊N/G⌋), or an
/// explicit strictly increasing list (borrowed; host memory for CPU, device memory for CUDA).
struct global_tokens {
  global_spec spec{};

  static constexpr global_tokens first(int g) noexcept { return {global_spec{global_rule::first, g, 0, nullptr}}; }
  static constexpr global_tokens strided(int g) noexcept {
    return {global_spec{global_rule::strided, g, 0, nullptr}};
  }
  static constexpr global_tokens explicit_list(int const* positions, int g) noexcept {
    return {global_spec{global_rule::list, g, 0, positions}};
  }
  /// G = min(⌈√N⌉, cap) leading tokens (the HSA 4K tier's rule).
  static constexpr global_tokens first_sqrt(int cap) noexcept {
    return {global_spec{global_rule::first, 0, cap, nullptr}};
  }

  DRDIFF_HOST_DEVICE constexpr sparse_union to_union() const noexcept {
    sparse_union u{};
    u.globals = spec;
    return u;
  }
  DRDIFF_HOST_DEVICE constexpr pattern bind(int n, int head) const noexcept { return to_union().bind(n, head); }
  void validate(int n, int heads, bool read_pointers = true) const {
    to_union().validate(n, heads, read_pointers);
  }
};

}  // namespace attn
DRDIFF_NAMESPACE_END
