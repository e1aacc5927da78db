#pragma once
/// \file
/// Thin wrappers over the warp-level tensor-core and copy instructions the attention kernels use
/// (sm_80+ forms, which Hopper runs): cp.async, ldmatrix, mma.sync m16n8k16 with fp32 accumulators.

#include <drdiff/cuda/config.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

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

/// Element conversions that do not lean on the 16-bit types' conversion operators, which builds with
/// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__ (PyTorch's extensions) remove.
DRDIFF_DEVICE float cuda_to_float(float x) { return x; }
DRDIFF_DEVICE float cuda_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
DRDIFF_DEVICE float cuda_to_float(__half x) { return __half2float(x); }
template <class T>
DRDIFF_DEVICE T cuda_from_float(float x) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16(x);
  else if constexpr (std::is_same_v<T, __half>) return __float2half(x);
  else return T(x);
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


// ---- Hopper warpgroup MMA (sm_90a) --------------------------------------------------------------
// Compiled only where the architecture-specific features exist (nvcc -gencode arch=compute_90a);
// DRDIFF_WGMMA tells device code which path it is in. Elsewhere the kernels use mma.sync.
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DRDIFF_WGMMA 1
#else
#define DRDIFF_WGMMA 0
#endif

/// Shared-memory matrix descriptor of a tile in the 128-byte swizzled layout (rows of 128 bytes,
/// 16-byte chunk c of row r stored at chunk c ^ (r % 8), 8-row groups 1024 bytes apart, the group's
/// base 1024-byte aligned). Both byte offsets are 1024: the operands used here span one swizzle atom
/// along their contiguous dimension, so only the 8-row group stride is read.
DRDIFF_DEVICE std::uint64_t wgmma_desc_sw128(void const* smem) {
  std::uint64_t d = (smem_u32(smem) & 0x3FFFFu) >> 4;
  d |= std::uint64_t(1024 >> 4) << 16;  // leading dimension byte offset
  d |= std::uint64_t(1024 >> 4) << 32;  // stride dimension byte offset
  d |= std::uint64_t(1) << 62;          // 128-byte swizzle
  return d;
}
/// The descriptor of the tile `elems` elements of T further on (a multiple of 8 elements: 16 bytes):
/// one add to the start-address field, which cannot carry out of it (shared addresses are below
/// 256 KB).
template <class T>
DRDIFF_DEVICE std::uint64_t wgmma_desc_advance(std::uint64_t desc, int elems) {
  return desc + std::uint64_t(unsigned(elems) * unsigned(sizeof(T)) >> 4);
}
DRDIFF_DEVICE void wgmma_fence() {
#if DRDIFF_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
DRDIFF_DEVICE void wgmma_commit() {
#if DRDIFF_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
DRDIFF_DEVICE void wgmma_wait() {
#if DRDIFF_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
/// Orders shared-memory writes of this thread (ordinary stores, cp.async) before later reads by the
/// async proxy (wgmma); put it before the barrier that publishes the data.
DRDIFF_DEVICE void fence_proxy_async() {
#if DRDIFF_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
/// Keeps the compiler from moving reads of `x` above a wgmma wait (or reusing its register early).
DRDIFF_DEVICE void wgmma_keep(float& x) { asm volatile("" : "+f"(x)::"memory"); }
DRDIFF_DEVICE void wgmma_keep(unsigned& x) { asm volatile("" : "+r"(x)::"memory"); }
template <class X, int N, int M>
DRDIFF_DEVICE void wgmma_keep(X (&a)[N][M]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < M; ++j) wgmma_keep(a[i][j]);
}

/// Per-type warpgroup MMA: d[O .. O+7][·] (+)= a · b for a 64×16 A in registers (the mma.sync A
/// fragment layout, 16 rows per warp) and a 16×64 B in shared memory (descriptor). The accumulator
/// layout is the mma.sync one: d[j][e] holds columns 8j + 2·(lane % 4) + e % 2 of rows lane / 4
/// (+ 8 for e ≥ 2) of the warp's 16 rows. TransB = 0: B stored N-major rows of K (as K-tiles of
/// keys); TransB = 1: B stored K rows of N (as V tiles). Accumulate = 0 overwrites d.
///
/// Seen with CUDA 13.0's ptxas: an A fragment kept in registers across loop iterations (loaded once,
/// used by every iteration's wgmma) had its registers given to other values, so later iterations read
/// garbage. Pass A fragments computed right before the call; operands that persist go through shared
/// memory (mma_ss).
// The 32 accumulator operands of one m64n64 block, d[O .. O+7][0 .. 3], as %0 .. %31.
#define DRDIFF_WGMMA_D_OPERANDS \
    "+f"(d[O + 0][0]), "+f"(d[O + 0][1]), "+f"(d[O + 0][2]), "+f"(d[O + 0][3]),\
    "+f"(d[O + 1][0]), "+f"(d[O + 1][1]), "+f"(d[O + 1][2]), "+f"(d[O + 1][3]),\
    "+f"(d[O + 2][0]), "+f"(d[O + 2][1]), "+f"(d[O + 2][2]), "+f"(d[O + 2][3]),\
    "+f"(d[O + 3][0]), "+f"(d[O + 3][1]), "+f"(d[O + 3][2]), "+f"(d[O + 3][3]),\
    "+f"(d[O + 4][0]), "+f"(d[O + 4][1]), "+f"(d[O + 4][2]), "+f"(d[O + 4][3]),\
    "+f"(d[O + 5][0]), "+f"(d[O + 5][1]), "+f"(d[O + 5][2]), "+f"(d[O + 5][3]),\
    "+f"(d[O + 6][0]), "+f"(d[O + 6][1]), "+f"(d[O + 6][2]), "+f"(d[O + 6][3]),\
    "+f"(d[O + 7][0]), "+f"(d[O + 7][1]), "+f"(d[O + 7][2]), "+f"(d[O + 7][3])
#define DRDIFF_WGMMA_D_REGS "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "

template <class T>
struct wgmma64 {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "wgmma64: bf16 or fp16 operands");

  /// A in registers, B in shared memory.
  template <int TransB, int O, int M>
  DRDIFF_DEVICE static void mma(float (&d)[M][4], unsigned const (&a)[4], std::uint64_t desc, int accumulate) {
    static_assert(O + 8 <= M, "wgmma64: accumulator block out of range");
#if DRDIFF_WGMMA
#define DRDIFF_WGMMA_RS(ty)                                                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %38, 0;\n"                                                   \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." ty "." ty " " DRDIFF_WGMMA_D_REGS               \
               "{%32, %33, %34, %35}, %36, p, 1, 1, %37;\n}\n"                                              \
               : DRDIFF_WGMMA_D_OPERANDS                                                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "n"(TransB), "r"(accumulate))
    if constexpr (std::is_same_v<T, __half>) DRDIFF_WGMMA_RS("f16");
    else DRDIFF_WGMMA_RS("bf16");
#undef DRDIFF_WGMMA_RS
#else
    (void)d; (void)a; (void)desc; (void)accumulate;
    __trap();
#endif
  }

  /// The same with A in shared memory too (K-major, descriptor).
  template <int TransB, int O, int M>
  DRDIFF_DEVICE static void mma_ss(float (&d)[M][4], std::uint64_t desc_a, std::uint64_t desc_b, int accumulate) {
    static_assert(O + 8 <= M, "wgmma64: accumulator block out of range");
#if DRDIFF_WGMMA
#define DRDIFF_WGMMA_SS(ty)                                                                                   \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %35, 0;\n"                                                   \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." ty "." ty " " DRDIFF_WGMMA_D_REGS               \
               "%32, %33, p, 1, 1, 0, %34;\n}\n"                                                              \
               : DRDIFF_WGMMA_D_OPERANDS                                                                      \
               : "l"(desc_a), "l"(desc_b), "n"(TransB), "r"(accumulate))
    if constexpr (std::is_same_v<T, __half>) DRDIFF_WGMMA_SS("f16");
    else DRDIFF_WGMMA_SS("bf16");
#undef DRDIFF_WGMMA_SS
#else
    (void)d; (void)desc_a; (void)desc_b; (void)accumulate;
    __trap();
#endif
  }
};

#undef DRDIFF_WGMMA_D_OPERANDS
#undef DRDIFF_WGMMA_D_REGS

}  // namespace detail
DRDIFF_NAMESPACE_END
