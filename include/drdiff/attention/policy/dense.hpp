#pragma once
/// \file
/// attn::dense — every query attends every key (bidirectional).

#include <drdiff/attention/policy/union.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Full bidirectional attention.
struct dense {
  DRDIFF_HOST_DEVICE constexpr sparse_union to_union() const noexcept {
    sparse_union u{};
    u.dense = true;
    return u;
  }
  DRDIFF_HOST_DEVICE constexpr pattern bind(int n, int head) const noexcept { return to_union().bind(n, head); }
  void validate(int n, int heads, bool read_pointers = true) const {
    to_union().validate(n, heads, read_pointers);
  }
};

}  // namespace attn
DRDIFF_NAMESPACE_END
