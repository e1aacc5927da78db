#pragma once
/// \file
/// cuBLAS helpers shared by the CUDA backend (MoE, anchors): status checks that throw drdiff::error,
/// the data-type map, and row-major C = A·Bᵀ with fp32 accumulation.

#include <drdiff/core/error.hpp>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

inline void cublas_check(cublasStatus_t s, char const* what) {
  DRDIFF_CHECK(s == CUBLAS_STATUS_SUCCESS, "cuBLAS call ", what, " failed with status ", int(s));
}
template <class T>
constexpr cudaDataType_t cuda_type() {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff (cuda): cuBLAS paths take float or __nv_bfloat16");
  return std::is_same_v<T, float> ? CUDA_R_32F : CUDA_R_16BF;
}

/// C (M×N, row-major, ldc) = A (M×K, row-major, lda) · B (N×K, row-major, ldb)ᵀ + beta·C, fp32
/// accumulation.
template <class TA, class TB, class TC>
void gemm_abt(cublasHandle_t h, int m, int n, int k, TA const* a, int lda, TB const* b, int ldb, TC* c, int ldc,
              float beta = 0.f) {
  if (m == 0 || n == 0) return;
  float const one = 1.f;
  cublas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, b, cuda_type<TB>(), ldb, a, cuda_type<TA>(),
                            lda, &beta, c, cuda_type<TC>(), ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
}

}  // namespace detail
DRDIFF_NAMESPACE_END
