#pragma once
/// \file
/// index_range: a run of token indices, either arithmetic (start + stride·j) or read from a sorted list.

#include <drdiff/core/config.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Token indices `start + stride·j` for `0 <= j < count`; when `list` is set, `list[start + j]`
/// instead (stride ignored). Indices are always strictly increasing.
///
/// Query tiles and key segments are index ranges. A stride of δ describes one dilation phase, which
/// kernels gather as a dense tile (see docs/attention.md, "strided segments").
struct index_range {
  int start = 0;
  int stride = 1;
  int count = 0;
  int const* list = nullptr;

  DRDIFF_HOST_DEVICE constexpr int operator[](int j) const noexcept {
    return list ? list[start + j] : start + stride * j;
  }
  DRDIFF_HOST_DEVICE constexpr bool empty() const noexcept { return count <= 0; }
  /// The first `n` indices (n clamped to [0, count]).
  DRDIFF_HOST_DEVICE constexpr index_range first(int n) const noexcept {
    index_range r = *this;
    r.count = n < 0 ? 0 : (n < count ? n : count);
    return r;
  }
  /// Indices j in [from, from + n) of this range, as a range of their own.
  DRDIFF_HOST_DEVICE constexpr index_range sub(int from, int n) const noexcept {
    index_range r = *this;
    if (list) {
      r.start = start + from;
    } else {
      r.start = start + stride * from;
    }
    r.count = n;
    return r;
  }
  /// How many leading indices are below `limit` (indices increase, so they form a prefix).
  DRDIFF_HOST_DEVICE constexpr int count_below(int limit) const noexcept {
    if (count <= 0) return 0;
    if (!list) {
      if (limit <= start) return 0;
      long long const n = (static_cast<long long>(limit) - start + stride - 1) / stride;
      return n < count ? static_cast<int>(n) : count;
    }
    int lo = 0, hi = count;  // binary search for the first index >= limit
    while (lo < hi) {
      int const mid = lo + (hi - lo) / 2;
      if (list[start + mid] < limit) lo = mid + 1; else hi = mid;
    }
    return lo;
  }
};

/// Contiguous indices [begin, end); empty when end <= begin.
DRDIFF_HOST_DEVICE constexpr index_range contiguous(int begin, int end) noexcept {
  return index_range{begin, 1, end > begin ? end - begin : 0, nullptr};
}

}  // namespace attn
DRDIFF_NAMESPACE_END
