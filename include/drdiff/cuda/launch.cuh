#pragma once
/// \file
/// Launch helpers of the CUDA backend, in one place:
/// - the kernel linkage (DRDIFF_KERNEL): every kernel defined in a header has internal linkage, so
///   any number of translation units may include it (a CTest test links two that include every
///   header);
/// - the call's stream (cuda_stream), the device's SM count and compute capability (asked once per
///   device), and the grids of grid-stride loops;
/// - workspace_carver: the one description of a caller-owned workspace, used both to answer the
///   size query and to lay out the pointers (CUB's alias_temporaries does the same), so the two can
///   never disagree.

#include <drdiff/core/backend.hpp>
#include <drdiff/cuda/error.cuh>

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

/// How every kernel of the library is declared: `DRDIFF_KERNEL void name(...)`, also for templates
/// (`template <class T> DRDIFF_KERNEL void __launch_bounds__(128) name(...)`). Internal linkage: a
/// header kernel is defined in every translation unit that includes it, and none clashes at link time.
#define DRDIFF_KERNEL static __global__

/// A grid-stride loop over i in [0, n) (size_t).
#define DRDIFF_GRID_STRIDE(i, n) \
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < (n); i += std::size_t(gridDim.x) * blockDim.x)

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// The stream of a call.
inline cudaStream_t cuda_stream(context<cuda> const& ctx) noexcept { return reinterpret_cast<cudaStream_t>(ctx.stream); }

/// One integer attribute of `device` (-1: the current one), cached per device: one query per device
/// and process, safe from several threads.
template <cudaDeviceAttr Attr>
int cached_device_attribute(int device) {
  if (device < 0) DRDIFF_CUDA_CHECK(cudaGetDevice(&device));
  constexpr int cached = 64;
  static std::atomic<int> value[cached] = {};  // the attribute + 1 (0: not asked yet; attributes may be 0)
  if (device < cached) {
    int const c = value[device].load(std::memory_order_relaxed);
    if (c > 0) return c - 1;
  }
  int n = 0;
  DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&n, Attr, device));
  if (device < cached && n >= 0) value[device].store(n + 1, std::memory_order_relaxed);
  return n;
}

/// Streaming multiprocessors of `device` (-1: the current one).
inline int sm_count(int device = -1) { return cached_device_attribute<cudaDevAttrMultiProcessorCount>(device); }

/// Compute capability of `device` (-1: the current one) as major·10 + minor: 90 for sm_90, the key of
/// the tuning selectors (cuda/tuning.cuh).
inline int device_arch(int device = -1) {
  return 10 * cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(device) +
         cached_device_attribute<cudaDevAttrComputeCapabilityMinor>(device);
}

/// Blocks of `threads` for a grid-stride loop over n elements: enough to cover n, at most `per_sm`
/// blocks per SM of the current device (more would only queue; the loop takes the rest).
inline unsigned stride_grid(std::size_t n, int threads, int per_sm) {
  std::size_t const cover = (n + std::size_t(threads) - 1) / std::size_t(threads);
  return unsigned(std::max<std::size_t>(1, std::min<std::size_t>(cover, std::size_t(sm_count()) * per_sm)));
}

/// Blocks of `threads` that cover n elements with one thread each.
inline unsigned cover_grid(std::size_t n, int threads) {
  return unsigned((n + std::size_t(threads) - 1) / std::size_t(threads));
}

/// Lays out a caller-owned workspace as a sequence of pieces, each starting on a 256-byte boundary.
/// The same code describes the pieces for the size query and for the call:
///
///     template <class Carver> buffers carve(Carver& w, sizes...) {
///       buffers b;
///       b.logits = w.template take<float>(tokens * experts);
///       b.count = w.template take<int>(tokens);
///       return b;
///     }
///     workspace_carver q;            carve(q, ...); q.bytes()        // the size query
///     workspace_carver w(workspace); auto b = carve(w, ...);         // the pointers
///
/// Without a base every piece is a null pointer. bytes() includes the slack that aligning an
/// arbitrary base takes, so it is the same number in both uses.
class workspace_carver {
 public:
  static constexpr std::size_t alignment = 256;

  workspace_carver() = default;
  explicit workspace_carver(void* base) noexcept
      : base_(base ? reinterpret_cast<unsigned char*>(round_up(reinterpret_cast<std::uintptr_t>(base))) : nullptr) {}

  /// The next piece: `count` values of T (0: an empty piece, still a distinct aligned address).
  template <class T>
  T* take(std::size_t count) noexcept {
    std::size_t const at = used_;
    used_ += round_up(count * sizeof(T));
    return base_ ? reinterpret_cast<T*>(base_ + at) : nullptr;
  }
  /// Bytes of the pieces taken so far, plus the alignment slack of the base.
  std::size_t bytes() const noexcept { return used_ + alignment; }
  /// True in a size query (no base).
  bool query() const noexcept { return base_ == nullptr; }

  static constexpr std::size_t round_up(std::size_t b) noexcept { return (b + alignment - 1) / alignment * alignment; }

 private:
  unsigned char* base_ = nullptr;
  std::size_t used_ = 0;
};

/// The bytes the pieces of `carve(workspace_carver&)` need.
template <class Carve>
std::size_t workspace_size(Carve&& carve) {
  workspace_carver w;
  carve(w);
  return w.bytes();
}

}  // namespace detail
DRDIFF_NAMESPACE_END
