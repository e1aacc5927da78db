#pragma once
/// \file
/// attn::local_window — query i attends keys j with |i − j| ≤ w.

#include <drdiff/attention/policy/union.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Bidirectional local window of half-width `window` (2w + 1 keys away from the edges).
struct local_window {
  int window = 256;

  DRDIFF_HOST_DEVICE constexpr sparse_union to_union() const noexcept {
    sparse_union u{};
    u.has_window = true;
    u.window = window;
    return u;
  }
  DRDIFF_HOST_DEVICE constexpr pattern bind(int n, int head) const noexcept { return to_union().bind(n, head); }
  void validate(int n, int heads, bool read_pointers = true) const {
    to_union().validate(n, heads, read_pointers);
  }
};

}  // namespace attn
DRDIFF_NAMESPACE_END
