#pragma once
/// \file
/// attn::dilated — query i attends keys j with |i − j| ≤ span and (i − j) mod rate = 0.

#include <drdiff/attention/policy/union.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Dilated (strided) attention of rate δ and span s. `maybe_head_rates`, when set, holds one rate
/// per head (size: heads; host memory for the CPU backend, device memory for CUDA) and overrides
/// `rate`, so heads with different dilations run in one call.
struct dilated {
  int rate = 2;
  int span = 1024;
  int const* maybe_head_rates = nullptr;

  DRDIFF_HOST_DEVICE constexpr sparse_union to_union() const noexcept {
    sparse_union u{};
    u.num_dilations = 1;
    u.dil[0] = dilation{rate, span};
    u.head_rates[0] = maybe_head_rates;
    return u;
  }
  DRDIFF_HOST_DEVICE constexpr pattern bind(int n, int head) const noexcept { return to_union().bind(n, head); }
  void validate(int n, int heads, bool read_pointers = true) const {
    to_union().validate(n, heads, read_pointers);
  }
};

}  // namespace attn
DRDIFF_NAMESPACE_END
