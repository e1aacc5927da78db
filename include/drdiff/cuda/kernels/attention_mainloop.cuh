#pragma once
/// \file
/// The mainloop of the tensor-core attention kernels, written once for all of them: the query tile
/// into shared memory, the K/V pipeline (cp.async through two or three stages, one barrier per chunk),
/// the online softmax over chunks of cuda_attention_bn keys, and the write-back of the output or of
/// the running state. The kernels (kernels/attention.cuh) only say how they find and mask their keys.
///
/// The matrix products are one of two MMA steps, picked once by the target: cuda_wgmma_step
/// (warpgroup MMA, sm_90a: Q and K read from shared memory, P from registers) or cuda_mma_sync_step
/// (mma.sync m16n8k16 with ldmatrix, every other target). Both are bf16/fp16 with fp32 accumulators.

#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/detail/mma.cuh>
#include <drdiff/cuda/kernels/attention_segments.cuh>

#include <cuda_runtime.h>

#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Row r, 16-byte chunk c of a tile of R rows × D columns, stored as D / 64 panels of R × 64 (128-byte
/// rows) with chunk c of row r at chunk c ^ (r % 8): the wgmma 128-byte swizzle layout, and
/// conflict-free for ldmatrix.
template <int R>
__device__ __forceinline__ int cuda_swz(int r, int c) {
  return ((c >> 3) * R + r) * 64 + (((c & 7) ^ (r & 7)) << 3);
}

/// The sm_80 MMA step (every target without wgmma): this warp's 16 query rows of a tile of BM rows
/// against a chunk of BN keys, mma.sync m16n8k16 with ldmatrix; Q is held as A fragments in
/// registers, loaded once per tile.
template <class T, int D, int BM, int BN>
struct cuda_mma_sync_step {
  static constexpr bool q_in_registers = true;
  struct q_frags {
    unsigned f[D / 16][4];
  };
  /// The first tile of the dynamic shared memory.
  static __device__ __forceinline__ T* tile_base(unsigned char* raw) { return reinterpret_cast<T*>(raw); }
  /// Q's A fragments, once the tile has landed in shared memory.
  static __device__ __forceinline__ void load_q(q_frags& qf, T const* sq) {
    int const warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      ldmatrix_x4(qf.f[kk], sq + cuda_swz<BM>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
  }
  /// s = Q·Kᵀ for the chunk ck (raw scores).
  static __device__ __forceinline__ void scores(float (&s)[BN / 8][4], T const* /*sq*/, T const* ck,
                                                q_frags const& qf) {
    using ops = mma16<T>;
    int const lane = int(threadIdx.x) % 32;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int np = 0; np < BN / 16; ++np) {
        unsigned bf[4];
        ldmatrix_x4(bf, ck + cuda_swz<BN>(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
        ops::mma(s[2 * np], qf.f[kk], bf[0], bf[1]);
        ops::mma(s[2 * np + 1], qf.f[kk], bf[2], bf[3]);
      }
  }
  /// acc += P·V: P the chunk's probabilities as A fragments (cuda_pack_p), V the chunk cv.
  static __device__ __forceinline__ void accumulate(float (&acc)[D / 8][4], unsigned const (&pa)[BN / 16][4],
                                                    T const* cv) {
    using ops = mma16<T>;
    int const lane = int(threadIdx.x) % 32;
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        unsigned bf[4];
        ldmatrix_x4_trans(bf, cv + cuda_swz<BN>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)));
        ops::mma(acc[2 * dp], pa[kk], bf[0], bf[1]);
        ops::mma(acc[2 * dp + 1], pa[kk], bf[2], bf[3]);
      }
    }
  }
};

/// The sm_90a MMA step: warpgroup MMAs (each group of 4 warps owns 64 rows of the tile); Q and K are
/// read from shared memory, P from registers, V from shared memory as a transposed B.
template <class T, int D, int BM, int BN>
struct cuda_wgmma_step {
  static_assert(BM % 64 == 0, "attention: the wgmma path runs whole warpgroups (4 warps, 64 rows)");
  static constexpr bool q_in_registers = false;
  struct q_frags {};
  /// The first tile at the next 1024-byte boundary (the 128-byte swizzle's period; the host adds the
  /// slack).
  static __device__ __forceinline__ T* tile_base(unsigned char* raw) {
    return reinterpret_cast<T*>(raw + ((1024 - (smem_u32(raw) & 1023)) & 1023));
  }
  static __device__ __forceinline__ void load_q(q_frags&, T const*) {}
  /// s = Q·Kᵀ: one warpgroup MMA per 16 columns of D, Q and K read from shared memory (K-major).
  static __device__ __forceinline__ void scores(float (&s)[BN / 8][4], T const* sq, T const* ck, q_frags const&) {
    int const warp = int(threadIdx.x) / 32;
    wgmma_fence();
    // (Descriptors: one per tile base, then constant steps — the address arithmetic is per chunk.)
    std::uint64_t const dq0 = wgmma_desc_sw128(sq + (warp >> 2) * 64 * 64), dk0 = wgmma_desc_sw128(ck);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma64<T>::template mma_ss<0, 0>(s, wgmma_desc_advance<T>(dq0, (kk >> 2) * BM * 64 + (kk & 3) * 16),
                                        wgmma_desc_advance<T>(dk0, (kk >> 2) * BN * 64 + (kk & 3) * 16), kk > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_keep(s);
  }
  /// acc += P·V: P from registers (the A fragments of cuda_pack_p), V from shared memory (rows of
  /// keys: transposed B).
  static __device__ __forceinline__ void accumulate(float (&acc)[D / 8][4], unsigned (&pa)[BN / 16][4], T const* cv) {
    wgmma_fence();
    std::uint64_t const dv0 = wgmma_desc_sw128(cv);
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      wgmma64<T>::template mma<1, 0>(acc, pa[kk], wgmma_desc_advance<T>(dv0, kk * 16 * 64), 1);
      if constexpr (D == 128)
        wgmma64<T>::template mma<1, D / 8 - 8>(acc, pa[kk], wgmma_desc_advance<T>(dv0, BN * 64 + kk * 16 * 64), 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_keep(pa);
    wgmma_keep(acc);
  }
};

/// The MMA step of the target being compiled (the one place that picks it).
template <class T, int D, int BM, int BN>
using cuda_mma_step =
#if DRDIFF_WGMMA
    cuda_wgmma_step<T, D, BM, BN>;
#else
    cuda_mma_sync_step<T, D, BM, BN>;
#endif

/// The chunk's probabilities P (fp32, the accumulator layout of S) as A fragments of T: pa[kk] holds
/// the 16 keys kk·16 .. kk·16 + 15.
template <class T, int BN>
__device__ __forceinline__ void cuda_pack_p(float const (&s)[BN / 8][4], unsigned (&pa)[BN / 16][4]) {
  using ops = mma16<T>;
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    pa[kk][0] = ops::pack(s[2 * kk][0], s[2 * kk][1]);
    pa[kk][1] = ops::pack(s[2 * kk][2], s[2 * kk][3]);
    pa[kk][2] = ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
    pa[kk][3] = ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
  }
}

/// One chunk of BN keys against this warp's 16 query rows of a tile of BM (a warpgroup's 64 on sm_90a):
/// S = Q·Kᵀ, the online-softmax update of the running max m (base 2), sum l and output acc, then
/// acc += P·V. K and V are the chunk's tiles in shared memory. An exact chunk (every key owned by
/// every row) skips the mask; otherwise mask(s, mx) scales the scores by sc (the softmax scale in
/// base 2), sets the scores of pairs the pass does not own to −inf and takes each row's maximum
/// into mx.
template <class Mma, class T, int D, int BM, int BN, class Mask>
__device__ __forceinline__ void cuda_attention_chunk(T const* sq, T const* ck, T const* cv,
                                                     typename Mma::q_frags const& qf, bool exact, float sc,
                                                     Mask const& mask, float (&m)[2], float (&l)[2],
                                                     float (&acc)[D / 8][4]) {
  float s[BN / 8][4];
  Mma::scores(s, sq, ck, qf);
  // Running max in base 2. Exact chunks keep the raw scores (the scale is applied inside the
  // exponent below, one FFMA each); masked chunks are scaled here with −inf on masked keys.
  float mx[2] = {-INFINITY, -INFINITY};
  float scl = 1.f;  // factor applied to s in the exponent
  if (exact) {  // the common case: no mask (kept apart so its loop stays branch-free)
    scl = sc;
    if (sc >= 0.f) {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], s[nt][e]);
    } else {
#pragma unroll
      for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) mx[e / 2] = fmaxf(mx[e / 2], -s[nt][e]);
    }
    mx[0] *= fabsf(sc);
    mx[1] *= fabsf(sc);
  } else {
    mask(s, mx);
  }
  float alpha[2];
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    mx[x] = fmaxf(mx[x], __shfl_xor_sync(0xffffffffu, mx[x], 1));
    mx[x] = fmaxf(mx[x], __shfl_xor_sync(0xffffffffu, mx[x], 2));
    float const m_new = fmaxf(m[x], mx[x]);
    alpha[x] = m_new == -INFINITY ? 1.f : fast_exp2(m[x] - m_new);
    mx[x] = m_new == -INFINITY ? 0.f : m_new;  // subtrahend for exp2 (all −inf rows give 0)
    m[x] = m_new;
    l[x] *= alpha[x];
  }
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float const pv = fast_exp2(fmaf(s[nt][e], scl, -mx[e / 2]));
      s[nt][e] = pv;
      l[e / 2] += pv;
    }
  // Rescale the output only when some row's max moved (after the first chunks it rarely does).
  if (__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      acc[dt][0] *= alpha[0];
      acc[dt][1] *= alpha[0];
      acc[dt][2] *= alpha[1];
      acc[dt][3] *= alpha[1];
    }
  }
  // O += P · V, P as A fragments of T. (The packing stays here, not in the MMA step: passing the fp32
  // scores into a function, even an inlined one, cost the sm_90a kernel spills.)
  unsigned pa[BN / 16][4];
  cuda_pack_p<T, BN>(s, pa);
  Mma::accumulate(acc, pa, cv);
}

/// The query tile into shared memory: rows row_of(r) for r < cnt; the rows past the tile read
/// row_of(0) and copy zeros (a fixed trip count). Commits the copies as one cp.async group.
template <int BM, int D, int NT, class T, class RowOf>
__device__ __forceinline__ void cuda_load_q(T* sq, T const* qb, std::int64_t q_seq, int cnt, RowOf const& row_of) {
  constexpr int CH = D / 8;
  static_assert(BM * CH % NT == 0, "attention: every thread copies the same number of Q pieces");
  int const tid = int(threadIdx.x);
#pragma unroll
  for (int i = 0; i < BM * CH / NT; ++i) {
    int const idx = tid + i * NT, r = idx / CH, c = idx % CH;
    std::int64_t const row = row_of(r < cnt ? r : 0);
    cp_async_16(sq + cuda_swz<BM>(r, c), qb + row * q_seq + c * 8, r < cnt ? 16 : 0);
  }
  cp_async_commit();
}

/// The K/V pipeline and the online softmax over one stream of `total` key chunks. K and V go through
/// S shared-memory stages: chunk c + S − 1 loads while chunk c computes, and the one barrier per chunk
/// both publishes chunk c and frees the stage of chunk c − 1. The kernel says how it finds its keys:
///   load(stage, c)     issues the copies of chunk c's K and V rows into stage `stage`
///   ahead(c)           runs after chunk c's barrier, before its math (the keys of later chunks)
///   exact(c) → bool    chunk c needs no mask
///   mask(c, s, mx)     the mask of a chunk that is not exact (cuda_attention_chunk)
/// The query tile must be in flight in sq (cuda_load_q); qf receives its fragments (on the targets
/// that hold Q in registers) at the first chunk after q_ready was set false, once per query tile.
/// Returns with every copy complete.
template <class Mma, class T, int D, int BM, int BN, int S, class Load, class Ahead, class Exact, class Mask>
__device__ __forceinline__ void cuda_attention_mainloop(T const* sq, T* sk, T* sv, int total, float sc,
                                                        Load const& load, Ahead const& ahead, Exact const& exact,
                                                        Mask const& mask, typename Mma::q_frags& qf, bool& q_ready,
                                                        float (&m)[2], float (&l)[2], float (&acc)[D / 8][4]) {
  static_assert(S == 2 || S == 3, "attention: 2 or 3 K/V stages (4 key slots hold chunks c .. c + S)");
  (void)q_ready;
#pragma unroll
  for (int c = 0; c + 1 < S; ++c) {
    if (c < total) load(c, c);
    cp_async_commit();
  }
  for (int c = 0, stage = 0; c < total; ++c, stage = stage == S - 1 ? 0 : stage + 1) {
    cp_async_wait<S - 2>();  // chunk c has landed (later ones may be in flight)
    fence_proxy_async();     // the tile is read by wgmma (async proxy) on sm_90a
    __syncthreads();         // every warp is past chunk c − 1: its stage (and key slot) is free
    if (c + S - 1 < total) load(stage == 0 ? S - 1 : stage - 1, c + S - 1);
    cp_async_commit();
    ahead(c);
    if constexpr (Mma::q_in_registers) {
      if (!q_ready) {
        Mma::load_q(qf, sq);
        q_ready = true;
      }
    }
    bool const ex = exact(c);
    cuda_attention_chunk<Mma, T, D, BM, BN>(
        sq, sk + stage * BN * D, sv + stage * BN * D, qf, ex, sc,
        [&](float (&s)[BN / 8][4], float (&mx)[2]) { mask(c, s, mx); }, m, l, acc);
  }
  cp_async_wait<0>();
}

/// Writes one row's result from fragment half x (rows g or g + 8) of this thread's accumulator: with
/// `out`, the normalized output and its log-sum-exp; else the running state (m, l, acc) at row sr of
/// the pass state or, for a key split, of the split partials.
template <int D, class T, class Seg>
__device__ __forceinline__ void cuda_write_row(cuda_attention_params<T, Seg> const& p, int b, int h, int row, bool out,
                                               bool split, std::int64_t sr, float m, float l,
                                               float const (&acc)[D / 8][4], int x) {
  int const tig = int(threadIdx.x) % 4;
  if (out) {
    float const inv = cuda_row_inverse(l);
    T* const o = p.o + b * p.os.batch + std::int64_t(row) * p.os.seq + h * p.os.head;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) mma16<T>::store2(o + dt * 8 + tig * 2, acc[dt][2 * x] * inv, acc[dt][2 * x + 1] * inv);
    if (p.lse && tig == 0)
      p.lse[(std::int64_t(b) * p.heads + h) * p.seq + row] = cuda_row_lse(m, l);
  } else {
    float* const pm = split ? p.part_m : p.st_m;
    float* const pl = split ? p.part_l : p.st_l;
    float* const pa = split ? p.part_acc : p.st_acc;
    if (tig == 0) {
      pm[sr] = m;
      pl[sr] = l;
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
      *reinterpret_cast<float2*>(pa + sr * D + dt * 8 + tig * 2) = make_float2(acc[dt][2 * x], acc[dt][2 * x + 1]);
  }
}

/// The write-back of a tile: each row's sum ℓ is reduced over the 4 threads that hold it, then each of
/// this thread's rows (local rows lr[x] < cnt; row_of(x) its token, part_row(x) its row in the split
/// partials) writes its output and lse (role `wb` is the last pass of the rows and no key split) or
/// its running state.
template <int D, class T, class Seg, class RowOf, class PartRow>
__device__ __forceinline__ void cuda_write_back(cuda_attention_params<T, Seg> const& p, cuda_cta_role const& wb, int b,
                                                int h, int const (&lr)[2], int cnt, RowOf const& row_of,
                                                PartRow const& part_row, float const (&m)[2], float (&l)[2],
                                                float const (&acc)[D / 8][4]) {
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    l[x] += __shfl_xor_sync(0xffffffffu, l[x], 1);
    l[x] += __shfl_xor_sync(0xffffffffu, l[x], 2);
  }
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    if (lr[x] >= cnt) continue;
    int const row = row_of(x);
    bool const out = wb.last && wb.split_keys == 0;
    std::int64_t const sr = out ? 0 : cuda_state_row(p, wb, b, h, row, part_row(x));
    cuda_write_row<D>(p, b, h, row, out, wb.split_keys > 0, sr, m[x], l[x], acc, x);
  }
}

}  // namespace detail
DRDIFF_NAMESPACE_END
