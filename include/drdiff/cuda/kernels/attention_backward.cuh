#pragma once
/// \file
/// The kernels of the CUDA attention backward (cuda/attention_backward.cuh runs them), FlashAttention-2's
/// recurrence over the forward's own passes, query tiles and key segments, so that every allowed pair
/// is visited exactly once and no other:
/// - attention_bwd_prep_kernel: D = rowsum(dO ∘ O) − ∂L/∂lse per row (one warp a row);
/// - attention_bwd_mma_kernel (bf16, fp16; head_dim 64 or 128): one CTA per query tile of a pass (and
///   key range of a key-split pass), 4 warps of 16 rows, chunks of cuda_attention_bn keys. Per chunk:
///   S = Q·Kᵀ and dP = dO·Vᵀ (mma.sync), P = exp(S − lse) under the pass's mask, dS = P ∘ (dP − D),
///   dQ += dS·K in registers; P and dS then go through shared memory so that each warp forms
///   dV = Pᵀ·dO and dK = dSᵀ·Q for 16 of the chunk's keys, added to fp32 accumulators by atomics
///   (a key is shared by the tiles and passes that reach it);
/// - attention_bwd_simt_kernel (fp32, any supported head_dim; for tests): one thread a row;
/// - attention_bwd_finish_kernel: the fp32 accumulators, scaled, into dQ, dK, dV with their strides.
///
/// Version one aims at the results (the float64 oracle's) rather than the speed: no wgmma, no TMA, and
/// the atomics on dK and dV cost 2·head_dim/64 additions per pair.

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/index_range.hpp>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/detail/mma.cuh>
#include <drdiff/cuda/kernels/attention_mainloop.cuh>
#include <drdiff/cuda/kernels/attention_segments.cuh>
#include <drdiff/cuda/kernels/attention_simt.cuh>
#include <drdiff/cuda/launch.cuh>

#include <cuda_runtime.h>

#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// The parameters of one backward launch (one pass of one group of heads), built by the host.
template <class T, class Seg>
struct cuda_attention_bwd_params {
  Seg table[cuda_table_heads];
  int table_size = 1;  ///< 1: table[0] for all heads; else heads head0 .. head0 + table_size − 1
  int head0 = 0;
  int heads_in_launch = 1;
  int pass = 0;
  int batch = 0, seq = 0, heads = 0, dim = 0;
  T const* q = nullptr;
  T const* k = nullptr;
  T const* v = nullptr;
  T const* o = nullptr;
  T const* d_o = nullptr;
  tensor_strides qs{}, ks{}, vs{}, os{}, dos{};
  float const* lse = nullptr;    ///< the forward's log-sum-exp, [batch·heads·seq] (natural log)
  float const* d_lse = nullptr;  ///< ∂L/∂lse (optional), same layout
  int const* kv_lens = nullptr;
  float scale_log2 = 0.f;  ///< softmax scale · log2(e)
  float* drow = nullptr;   ///< D per row, [batch·heads·seq]
  float* dq_acc = nullptr;  ///< [batch][heads][seq][dim], unscaled Σ dS·K
  float* dk_acc = nullptr;  ///< unscaled Σ dSᵀ·Q
  float* dv_acc = nullptr;  ///< Σ Pᵀ·dO
  int split_keys = 0;       ///< > 0: blockIdx.z covers keys [z·split_keys, (z+1)·split_keys)
};

/// p[0] += a, p[1] += b (one vector atomic on sm_90, two elsewhere); p is 8-byte aligned.
__device__ __forceinline__ void cuda_atomic_add2(float* p, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(p), make_float2(a, b));
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

/// The row's lse in base 2 and D, and whether it takes part: a row past the tile or with no key
/// (lse = −∞) gets −∞, which makes its P zero.
template <class P>
__device__ __forceinline__ void cuda_bwd_row(P const& p, std::int64_t bh, bool in_tile, int row, float& lse2,
                                             float& drow) {
  lse2 = -INFINITY;
  drow = 0.f;
  if (!in_tile) return;
  float const l = p.lse[bh * p.seq + row];
  lse2 = l * 1.4426950408889634f;  // (−∞ stays −∞, NaN stays NaN)
  drow = p.drow[bh * p.seq + row];
}

/// P = 2^(s·sc − lse2) where `ok`, else 0 (a NaN lse2 gives NaN: a NaN that reached the row in the
/// forward reaches its gradients).
__device__ __forceinline__ float cuda_bwd_prob(float s, float sc, float lse2, bool ok) {
  return ok && lse2 != -INFINITY ? exp2f(fmaf(s, sc, -lse2)) : 0.f;
}

// ---------------------------------------------------------------------------------------------------

/// D = rowsum(dO ∘ O) − ∂L/∂lse: one warp per row of [batch·heads·seq].
template <class T, class Seg>
DRDIFF_KERNEL void __launch_bounds__(256) attention_bwd_prep_kernel(__grid_constant__ const cuda_attention_bwd_params<T, Seg> p) {
  std::int64_t const rows = std::int64_t(p.batch) * p.heads * p.seq;
  std::int64_t const r = std::int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (r >= rows) return;
  int const lane = int(threadIdx.x) % 32;
  int const i = int(r % p.seq);
  std::int64_t const bh = r / p.seq;
  int const h = int(bh % p.heads), b = int(bh / p.heads);
  T const* const o = p.o + b * p.os.batch + std::int64_t(i) * p.os.seq + h * p.os.head;
  T const* const g = p.d_o + b * p.dos.batch + std::int64_t(i) * p.dos.seq + h * p.dos.head;
  float s = 0.f;
  for (int d = lane; d < p.dim; d += 32) s += cuda_to_float(o[d]) * cuda_to_float(g[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
  if (lane == 0) p.drow[r] = p.d_lse ? s - p.d_lse[r] : s;
}

/// dQ = scale·ΣdS·K, dK = scale·ΣdSᵀ·Q and dV = ΣPᵀ·dO from the accumulators ([b][h][i][d]) into
/// the outputs' layouts.
template <class T>
DRDIFF_KERNEL void attention_bwd_finish_kernel(float const* dq_acc, float const* dk_acc, float const* dv_acc, T* dq,
                                               T* dk, T* dv, tensor_strides dqs, tensor_strides dks,
                                               tensor_strides dvs, int batch, int seq, int heads, int dim,
                                               float scale) {
  std::size_t const total = std::size_t(batch) * heads * seq * dim;
  DRDIFF_GRID_STRIDE(e, total) {
    std::size_t rest = e / dim;
    int const d = int(e % dim);
    int const i = int(rest % seq);
    rest /= seq;
    int const h = int(rest % heads), b = int(rest / heads);
    dq[b * dqs.batch + std::int64_t(i) * dqs.seq + h * dqs.head + d] = cuda_from_float<T>(dq_acc[e] * scale);
    dk[b * dks.batch + std::int64_t(i) * dks.seq + h * dks.head + d] = cuda_from_float<T>(dk_acc[e] * scale);
    dv[b * dvs.batch + std::int64_t(i) * dvs.seq + h * dvs.head + d] = cuda_from_float<T>(dv_acc[e]);
  }
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core kernel: 4 warps × 16 query rows, chunks of 64 keys, head_dim D (64 or 128), mma.sync.

/// s = A·Bᵀ for this warp's 16 rows of the [64 × D] tile `sa` (Q or dO, swizzled as cuda_swz<64>) and
/// the chunk's [BN × D] tile `sb` (K or V): the forward's score product, with the A fragments read from
/// shared memory at each step instead of held in registers (the backward has two such tiles).
template <class T, int D, int BN>
__device__ __forceinline__ void cuda_bwd_row_product(float (&s)[BN / 8][4], T const* sa, T const* sb) {
  constexpr int BM = 64;
  using ops = mma16<T>;
  int const warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
#pragma unroll
  for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
#pragma unroll 1  // (unrolled, the loads of later steps are hoisted and the 128-wide tiles spill)
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned a[4];
    ldmatrix_x4(a, sa + cuda_swz<BM>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
    for (int np = 0; np < BN / 16; ++np) {
      unsigned bf[4];
      ldmatrix_x4(bf, sb + cuda_swz<BN>(np * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
      ops::mma(s[2 * np], a, bf[0], bf[1]);
      ops::mma(s[2 * np + 1], a, bf[2], bf[3]);
    }
  }
}

/// This warp's share of dX = Aᵀ·B for 16 of the chunk's keys (rows 16·warp … of the result): A is the
/// [64 rows × 64 keys] tile `sa` (P or dS, swizzled as cuda_swz<64>), B the [64 rows × D] tile `sb`
/// (dO or Q); the contraction runs over the 64 query rows.
template <class T, int D>
__device__ __forceinline__ void cuda_bwd_key_product(float (&out)[D / 8][4], T const* sa, T const* sb) {
  constexpr int BM = 64;
  using ops = mma16<T>;
  int const warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) out[dt][e] = 0.f;
#pragma unroll 1  // (as above)
  for (int kk = 0; kk < BM / 16; ++kk) {
    // A[m = key][k = row] = sa[row][key]: the transposed 8×8 blocks of rows kk·16 …, keys 16·warp …
    unsigned a[4];
    ldmatrix_x4_trans(a, sa + cuda_swz<BM>(kk * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * warp + ((lane >> 3) & 1)));
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      unsigned bf[4];  // B[k = row][n = d] = sb[row][d], rows of the contraction: transposed loads
      ldmatrix_x4_trans(bf, sb + cuda_swz<BM>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)));
      ops::mma(out[2 * dp], a, bf[0], bf[1]);
      ops::mma(out[2 * dp + 1], a, bf[2], bf[3]);
    }
  }
}

/// Adds this warp's rows of a [keys × D] product (cuda_bwd_key_product) to the accumulator rows of
/// keys[16·warp + g] and keys[16·warp + g + 8] (no key: nothing).
template <int D>
__device__ __forceinline__ void cuda_bwd_add_keys(float* acc, int const* keys, float const (&out)[D / 8][4]) {
  int const warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32, g = lane / 4, tig = lane % 4;
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    int const j = keys[warp * 16 + g + 8 * x];
    if (j < 0) continue;
    float* const row = acc + std::int64_t(j) * D + tig * 2;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) cuda_atomic_add2(row + dt * 8, out[dt][2 * x], out[dt][2 * x + 1]);
  }
}

template <class T, int D, class Seg>
DRDIFF_KERNEL void __launch_bounds__(128) attention_bwd_mma_kernel(__grid_constant__ const cuda_attention_bwd_params<T, Seg> p) {
  constexpr int BM = 64, BN = cuda_attention_bn, NT = 128, CH = D / 8;
  static_assert(BN == 64, "attention backward: chunks of 64 keys (one swizzle panel of P and dS)");
  using step = cuda_mma_sync_step<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sq = reinterpret_cast<T*>(smem_raw);  // BM × D
  T* const sdo = sq + BM * D;                     // BM × D
  T* const sk = sdo + BM * D;                     // 2 stages of BN × D
  T* const sv = sk + 2 * BN * D;                  // 2 stages of BN × D
  T* const sp = sv + 2 * BN * D;                  // BM × BN: P
  T* const sds = sp + BM * BN;                    // BM × BN: dS
  __shared__ __align__(16) unsigned char segs_raw[sizeof(cuda_segment) * cuda_segment_batch];
  auto* const segs = reinterpret_cast<cuda_segment*>(segs_raw);  // (index_range has a constructor)
  __shared__ int n_segs, seen;
  __shared__ int seg_start[cuda_segment_batch + 1];
  __shared__ int tail_chunk;  // (no key tail here: every pass runs on its own)
  __shared__ __align__(16) int kidx[2][BN];  // key per row of chunks c (slot c % 2); cuda_no_key: none
  __shared__ unsigned kexact[2];             // byte w: keys 32w .. 32w + 31 need no mask
  constexpr unsigned exact_all = 0x101u;

  int b, h;
  cuda_bh(p, b, h);
  Seg const& seg = p.table[p.table_size == 1 ? 0 : h - p.head0];
  int const t = int(blockIdx.x), pass = p.pass;
  if (t >= seg.num_q_tiles(pass)) return;  // past this head's tiles (another head in the launch has more)
  attn::index_range const all_rows = seg.q_tile(pass, t);
  if (all_rows.count <= 0) return;
  // Keys stop at the batch's length, kept within [0, seq] (device lengths are not checked on the host).
  int const L = p.kv_lens ? min(max(p.kv_lens[b], 0), p.seq) : p.seq;
  int const key_lo = p.split_keys > 0 ? int(blockIdx.z) * p.split_keys : 0;
  int const key_hi = p.split_keys > 0 ? min(L, key_lo + p.split_keys) : L;
  if (key_lo >= key_hi) return;
  int const tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  auto const view = attn::pass_view(seg, pass);
  attn::pass_traits const traits = view.traits(seg);
  bool const band = traits.has_band();
  int const band_lo = traits.band_lo, band_len = traits.band_hi - traits.band_lo;
  std::int64_t const bh = std::int64_t(b) * p.heads + h;
  T const* const qb = p.q + b * p.qs.batch + h * p.qs.head;
  T const* const kb = p.k + b * p.ks.batch + h * p.ks.head;
  T const* const vb = p.v + b * p.vs.batch + h * p.vs.head;
  T const* const gb = p.d_o + b * p.dos.batch + h * p.dos.head;
  float* const dq_acc = p.dq_acc + bh * p.seq * D;
  float* const dk_acc = p.dk_acc + bh * p.seq * D;
  float* const dv_acc = p.dv_acc + bh * p.seq * D;

  for (int r0 = 0; r0 < all_rows.count; r0 += BM) {
    attn::index_range const rows = all_rows.sub(r0, min(BM, all_rows.count - r0));
    int const cnt = rows.count;
    int const lr[2] = {warp * 16 + g, warp * 16 + g + 8};
    int row_id[2];
    bool row_live[2];
    float lse2[2], drow[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      row_id[x] = lr[x] < cnt ? rows[lr[x]] : 0;
      row_live[x] = lr[x] < cnt && view.live_row(seg, row_id[x]);
      cuda_bwd_row(p, bh, lr[x] < cnt, row_id[x], lse2[x], drow[x]);
    }
    float dq[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;

    auto row_of = [&](int r) -> std::int64_t { return unsigned(rows[r]); };
    cuda_load_q<BM, D, NT>(sq, qb, p.qs.seq, cnt, row_of);
    cuda_load_q<BM, D, NT>(sdo, gb, p.dos.seq, cnt, row_of);

    for (int skip = 0;; skip += cuda_segment_batch) {
      if (tid == 0)
        cuda_collect_segments(seg, pass, t, false, BN, segs, &n_segs, &seen, seg_start, &tail_chunk, skip, key_lo,
                              key_hi);
      __syncthreads();
      int const ns = n_segs;
      bool const more = seen > skip + cuda_segment_batch;
      int const total_keys = seg_start[ns];
      int const total = (total_keys + BN - 1) / BN;

      auto fill_keys = [&](int c) {  // chunk c's key per row and exactness, into slot c % 2 (whole warps)
        if (tid >= BN) return;
        int const slot = c & 1, gk = c * BN + tid;
        int j = cuda_no_key;
        bool ex = false;
        if (gk < total_keys) {
          int s = 0;  // the last segment starting at or before gk
          while (seg_start[s + 1] <= gk) ++s;
          j = segs[s].keys[gk - seg_start[s]];
          ex = segs[s].exact != 0;
        }
        kidx[slot][tid] = j;
        bool const all = __all_sync(0xffffffffu, ex);
        if (lane == 0) reinterpret_cast<unsigned char*>(&kexact[slot])[warp] = all ? 1 : 0;
      };
      auto load_chunk = [&](int c) {  // K and V rows of chunk c, gathered by key, into stage c % 2
        T* const dk = sk + (c & 1) * BN * D;
        T* const dv = sv + (c & 1) * BN * D;
        int const* const kx = kidx[c & 1];
#pragma unroll
        for (int i = 0; i < BN * CH / NT; ++i) {
          int const idx = tid + i * NT, r = idx / CH, ch = idx % CH, j = kx[r];
          std::int64_t const row = unsigned(max(j, 0));  // an empty slot reads key 0 and copies zeros
          int const bytes = j >= 0 ? 16 : 0;
          cp_async_16(dk + cuda_swz<BN>(r, ch), kb + row * p.ks.seq + ch * 8, bytes);
          cp_async_16(dv + cuda_swz<BN>(r, ch), vb + row * p.vs.seq + ch * 8, bytes);
        }
        cp_async_commit();
      };
      if (total > 0) {
        fill_keys(0);
        __syncthreads();
        load_chunk(0);
      }
      for (int c = 0; c < total; ++c) {
        int const slot = c & 1;
        cp_async_wait<0>();  // chunk c (and, at the first, the Q and dO tiles) has landed
        __syncthreads();     // … for every thread; chunk c − 1 is done with its slot, stage and P/dS tiles
        if (c + 1 < total) fill_keys(c + 1);
        __syncthreads();
        if (c + 1 < total) load_chunk(c + 1);
        T const* const ck = sk + slot * BN * D;
        T const* const cv = sv + slot * BN * D;
        int const* const keys = kidx[slot];
        bool const exact = (kexact[slot] & exact_all) == exact_all;

        float s[BN / 8][4], ds[BN / 8][4];
        cuda_bwd_row_product<T, D, BN>(s, sq, ck);    // S = Q·Kᵀ
        cuda_bwd_row_product<T, D, BN>(ds, sdo, cv);  // dP = dO·Vᵀ
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt) {
          int2 const j2 = *reinterpret_cast<int2 const*>(keys + nt * 8 + tig * 2);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int const x = e / 2, j = (e & 1) ? j2.y : j2.x;
            bool ok;
            if (exact) ok = true;
            else if (band) ok = j >= 0 && row_live[x] && unsigned(abs(row_id[x] - j) - band_lo) <= unsigned(band_len);
            else ok = j >= 0 && row_live[x] && view.owns_key(seg, row_id[x], j);
            float const pr = cuda_bwd_prob(s[nt][e], p.scale_log2, lse2[x], ok);
            s[nt][e] = pr;                                   // P
            ds[nt][e] = ok ? pr * (ds[nt][e] - drow[x]) : 0.f;  // dS = P ∘ (dP − D), 0 off the mask
          }
        }
        unsigned pa[BN / 16][4];
        cuda_pack_p<T, BN>(ds, pa);
        step::accumulate(dq, pa, ck);  // dQ += dS·K
        // P and dS through shared memory: the key-side products contract over the tile's rows.
#pragma unroll
        for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
          for (int x = 0; x < 2; ++x) {
            int const off = cuda_swz<BM>(warp * 16 + g + 8 * x, nt) + tig * 2;
            mma16<T>::store2(sp + off, s[nt][2 * x], s[nt][2 * x + 1]);
            mma16<T>::store2(sds + off, ds[nt][2 * x], ds[nt][2 * x + 1]);
          }
        __syncthreads();
        float kv[D / 8][4];
        cuda_bwd_key_product<T, D>(kv, sp, sdo);  // dV = Pᵀ·dO for 16 keys
        cuda_bwd_add_keys<D>(dv_acc, keys, kv);
        cuda_bwd_key_product<T, D>(kv, sds, sq);  // dK = dSᵀ·Q
        cuda_bwd_add_keys<D>(dk_acc, keys, kv);
      }
      cp_async_wait<0>();
      __syncthreads();
      if (!more) break;
    }

    // dQ: this tile's part of its rows (other passes and key splits add theirs).
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if (lr[x] >= cnt) continue;
      float* const row = dq_acc + std::int64_t(row_id[x]) * D + tig * 2;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) cuda_atomic_add2(row + dt * 8, dq[dt][2 * x], dq[dt][2 * x + 1]);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// SIMT kernel (fp32, any supported head_dim): one thread per query row, keys staged 16 at a time.

template <class T, class Seg>
DRDIFF_KERNEL void __launch_bounds__(64) attention_bwd_simt_kernel(__grid_constant__ const cuda_attention_bwd_params<T, Seg> p) {
  constexpr int BM = 64, BN = 16, DMAX = 256;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* const sk = reinterpret_cast<float*>(smem_raw);  // BN × dim
  float* const sv = sk + BN * p.dim;
  __shared__ __align__(16) unsigned char segs_raw[sizeof(cuda_segment) * cuda_segment_batch];
  auto* const segs = reinterpret_cast<cuda_segment*>(segs_raw);
  __shared__ int n_segs, seen;
  __shared__ int key_idx[BN];

  int b, h;
  cuda_bh(p, b, h);
  Seg const& seg = p.table[p.table_size == 1 ? 0 : h - p.head0];
  int const t = int(blockIdx.x), pass = p.pass, D = p.dim, tid = threadIdx.x;
  if (t >= seg.num_q_tiles(pass)) return;
  attn::index_range const all_rows = seg.q_tile(pass, t);
  if (all_rows.count <= 0) return;
  // Keys stop at the batch's length, kept within [0, seq] (device lengths are not checked on the host).
  int const L = p.kv_lens ? min(max(p.kv_lens[b], 0), p.seq) : p.seq;
  int const key_lo = p.split_keys > 0 ? int(blockIdx.z) * p.split_keys : 0;
  int const key_hi = p.split_keys > 0 ? min(L, key_lo + p.split_keys) : L;
  if (key_lo >= key_hi) return;
  std::int64_t const bh = std::int64_t(b) * p.heads + h;
  T const* const qb = p.q + b * p.qs.batch + h * p.qs.head;
  T const* const kb = p.k + b * p.ks.batch + h * p.ks.head;
  T const* const vb = p.v + b * p.vs.batch + h * p.vs.head;
  T const* const gb = p.d_o + b * p.dos.batch + h * p.dos.head;
  float* const dk_acc = p.dk_acc + bh * p.seq * D;
  float* const dv_acc = p.dv_acc + bh * p.seq * D;

  for (int r0 = 0; r0 < all_rows.count; r0 += BM) {
    attn::index_range const rows = all_rows.sub(r0, min(BM, all_rows.count - r0));
    bool const active = tid < rows.count;
    int const row = active ? rows[tid] : 0;
    float q[DMAX], go[DMAX], dq[DMAX];
    for (int d = 0; d < D; ++d) {
      q[d] = active ? float(qb[std::int64_t(row) * p.qs.seq + d]) : 0.f;
      go[d] = active ? float(gb[std::int64_t(row) * p.dos.seq + d]) : 0.f;
      dq[d] = 0.f;
    }
    float lse2, drow;
    cuda_bwd_row(p, bh, active, row, lse2, drow);
    cuda_simt_key_walk<BN>(seg, pass, t, key_lo, key_hi, kb, p.ks.seq, vb, p.vs.seq, D, sk, sv, key_idx, segs, &n_segs,
                           &seen, [&](int kc, bool exact) {
      if (!active) return;
      for (int r = 0; r < kc; ++r) {
        int const j = key_idx[r];
        if (!exact && !seg.owns(pass, row, j)) continue;
        float dot = 0.f, dpv = 0.f;
        for (int d = 0; d < D; ++d) {
          dot += q[d] * sk[r * D + d];
          dpv += go[d] * sv[r * D + d];
        }
        float const pr = cuda_bwd_prob(dot, p.scale_log2, lse2, true);
        float const dsv = pr * (dpv - drow);
        for (int d = 0; d < D; ++d) {
          dq[d] += dsv * sk[r * D + d];
          atomicAdd(dk_acc + std::int64_t(j) * D + d, dsv * q[d]);
          atomicAdd(dv_acc + std::int64_t(j) * D + d, pr * go[d]);
        }
      }
    });
    if (active)
      for (int d = 0; d < D; ++d) atomicAdd(p.dq_acc + (bh * p.seq + row) * D + d, dq[d]);
  }
}

}  // namespace detail
DRDIFF_NAMESPACE_END
