#pragma once
/// \file
/// Portability macros shared by every DrDiff header. No CUDA or Eigen headers are needed here.

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DRDIFF_HOST_DEVICE __host__ __device__ inline
#else
#define DRDIFF_HOST_DEVICE inline
#endif

/// Placed before a __host__ __device__ template that calls a user functor, so a __device__-only
/// functor can be passed from device code (nvcc otherwise rejects the host instantiation).
#if defined(__CUDACC__) && !defined(__clang__)
#define DRDIFF_EXEC_CHECK_DISABLE _Pragma("nv_exec_check_disable")
#else
#define DRDIFF_EXEC_CHECK_DISABLE
#endif

/// Versioned namespace (ODR hygiene when two DrDiff versions meet in one program).
#define DRDIFF_NAMESPACE_BEGIN \
  namespace drdiff {           \
  inline namespace v0 {
#define DRDIFF_NAMESPACE_END \
  }                          \
  }

#if defined(__cpp_concepts) && __cpp_concepts >= 201907L
#define DRDIFF_HAS_CONCEPTS 1
#else
#define DRDIFF_HAS_CONCEPTS 0
#endif

#if __cplusplus < 201703L && !defined(_MSVC_LANG)
#error "DrDiff needs C++17 or later (set CMAKE_CXX_STANDARD 17 or link drdiff::drdiff)."
#endif
