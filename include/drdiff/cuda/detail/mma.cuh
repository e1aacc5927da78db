#pragma once
/// \file
/// Thin wrappers over the warp-level tensor-core and copy instructions the attention kernels use
/// (sm_80+ forms, which Hopper runs): cp.async, ldmatrix, mma.sync m16n8k16 with fp32 accumulators.

#include <drdiff/cuda/config.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

DRDIFF_DEVICE unsigned smem_u32(void const* p) { return static_cast<unsigned>(__cvta_generic_to_shared(p)); }

/// 16-byte asynchronous copy global → shared; `bytes` = 0 fills the 16 bytes with zeros.
DRDIFF_DEVICE void cp_async_16(void* smem, void const* gmem, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem), "r"(bytes));
}
DRDIFF_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
DRDIFF_DEVICE void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

DRDIFF_DEVICE void ldmatrix_x4(unsigned (&r)[4], void const* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}
DRDIFF_DEVICE void ldmatrix_x4_trans(unsigned (&r)[4], void const* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

/// 2^x with the hardware approximation (MUFU.EX2, about 2 ulp; 2^−inf = 0).
DRDIFF_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

/// Per-type pieces of the 16-bit tensor-core path.
template <class T>
struct mma16;

template <>
struct mma16<__nv_bfloat16> {
  DRDIFF_DEVICE static unsigned pack(float a, float b) {
    __nv_bfloat162 v = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<unsigned*>(&v);
  }
  DRDIFF_DEVICE static void store2(__nv_bfloat16* p, float a, float b) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
  }
  /// c += a · b for a 16×16 (row) by 16×8 (col) product.
  DRDIFF_DEVICE static void mma(float (&c)[4], unsigned const (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct mma16<__half> {
  DRDIFF_DEVICE static unsigned pack(float a, float b) {
    __half2 v = __floats2half2_rn(a, b);
    return *reinterpret_cast<unsigned*>(&v);
  }
  DRDIFF_DEVICE static void store2(__half* p, float a, float b) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
  }
  DRDIFF_DEVICE static void mma(float (&c)[4], unsigned const (&a)[4], unsigned b0, unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
