#pragma once
/// \file
/// Owned device memory for the CUDA backend: Thrust vectors with an allocator whose free never
/// throws. Thrust's own device allocator throws thrust::system_error when cudaFree fails, which it
/// does after any sticky CUDA error; its deallocate is noexcept and runs in destructors, so a failure
/// there would end the process (std::terminate) while the error that caused it is still on its way
/// to the caller as a drdiff::error. Dropping the failed free lets that error arrive.

#include <drdiff/core/config.hpp>

#include <cuda_runtime.h>
#include <thrust/device_allocator.h>
#include <thrust/device_vector.h>

#include <cstddef>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// thrust::device_allocator (cudaMalloc through Thrust's device memory resource), except that a
/// failing cudaFree is dropped (see the file comment).
template <class T>
class device_allocator : public thrust::device_allocator<T> {
 public:
  using base = thrust::device_allocator<T>;
  template <class U>
  struct rebind {
    using other = device_allocator<U>;
  };
  device_allocator() = default;
  device_allocator(device_allocator const&) = default;
  template <class U>
  device_allocator(device_allocator<U> const& other) : base(other) {}
  device_allocator& operator=(device_allocator const&) = default;

  void deallocate(typename base::pointer p, std::size_t) noexcept {
    if (cudaFree(thrust::raw_pointer_cast(p)) != cudaSuccess) (void)cudaGetLastError();
  }
};

/// A Thrust device vector on that allocator.
template <class T>
using device_vector = thrust::device_vector<T, device_allocator<T>>;

}  // namespace detail
DRDIFF_NAMESPACE_END
