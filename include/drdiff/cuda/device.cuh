#pragma once
/// \file
/// Device discovery for the CUDA backend.

#include <drdiff/cuda/error.cuh>

DRDIFF_NAMESPACE_BEGIN

/// Number of usable CUDA devices; 0 (not an error) when there is no device or no driver.
inline int cuda_device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky "no device" / "no driver" status
    return 0;
  }
  return n;
}

DRDIFF_NAMESPACE_END
