#pragma once
/// \file
/// The tensor-core attention kernels (bf16, fp16). One CTA runs one query tile of one pass of one
/// (batch, head) through the mainloop of kernels/attention_mainloop.cuh; the two kernels differ only
/// in how they find and mask their keys:
/// - attention_mma_kernel, the general one: the tile's key segments (from the pre-pass's tables, or
///   collected by the policy's visitor in one thread) form one stream of keys, resolved a few chunks
///   ahead into shared memory, gathered by index and masked through the pass's capabilities (a
///   distance band where the pass declares one, else its ownership test);
/// - attention_band_kernel: a pass whose tiles see one run of keys (attn::pass_traits::one_run, the
///   window of a pattern) finds, copies and masks its keys by arithmetic.
/// fp32 runs the SIMT kernel of kernels/attention_simt.cuh.

#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/index_range.hpp>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/detail/mma.cuh>
#include <drdiff/cuda/kernels/attention_mainloop.cuh>
#include <drdiff/cuda/kernels/attention_segments.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/cuda/tuning.cuh>

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------------------------------
// General kernel: W warps × 16 query rows, chunks of cuda_attention_bn keys, head_dim D (64 or 128).

template <class T, int D, int S, int W, class Seg>
DRDIFF_KERNEL void __launch_bounds__(32 * W, cuda_attention_min_blocks(D, W))
    attention_mma_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p) {
  static_assert(W == 4 || W == 8, "attention: 4 or 8 warps (64 or 128 query rows per tile)");
  constexpr int BM = 16 * W, BN = cuda_attention_bn, CH = D / 8, NT = 32 * W;
  using mma = cuda_mma_step<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sq = mma::tile_base(smem_raw);
  T* const sk = sq + BM * D;  // S stages of BN × D
  T* const sv = sk + S * BN * D;
  __shared__ __align__(16) unsigned char segs_raw[sizeof(cuda_segment) * cuda_segment_batch];
  auto* const segs = reinterpret_cast<cuda_segment*>(segs_raw);  // (index_range has a constructor)
  __shared__ int n_segs, seen;
  __shared__ int seg_start[cuda_segment_batch + 1];
  __shared__ int tail_chunk;  // first chunk of the key tail (INT_MAX: none)
  // Key index per row of chunks c .. c + 3 (slot c % 4); cuda_no_key: none.
  __shared__ __align__(16) int kidx[4][BN];
  // Byte w of kexact[slot]: the chunk's keys 32w .. 32w + 31 need no mask (written by the warp that
  // resolved them; the chunk is exact when every byte is 1).
  __shared__ unsigned kexact[4];
  static_assert(BN / 32 <= 4, "attention: one byte of kexact per warp of keys");
  constexpr unsigned exact_all = BN == 32 ? 0x1u : BN == 64 ? 0x101u : BN == 96 ? 0x10101u : 0x1010101u;

  int b, h;
  cuda_bh(p, b, h);
  Seg const& seg = p.table[p.table_size == 1 ? 0 : h - p.head0];
  cuda_cta_role const role = cuda_role(p);  // read again where needed (fewer registers in the loop)
  int const t = role.t, pass = role.pass;
  if (t >= seg.num_q_tiles(pass)) return;  // past this head's tiles (another head in the launch has more)
  attn::index_range const all_rows = seg.q_tile(pass, t);
  if (all_rows.count <= 0) return;
  // Keys stop at the batch's length, kept within [0, seq] (device lengths are not checked on the host).
  int const L = p.kv_lens ? min(max(p.kv_lens[b], 0), p.seq) : p.seq;
  int const key_lo = role.split_keys > 0 ? role.split * role.split_keys : 0;
  int const key_hi = role.split_keys > 0 ? min(L, key_lo + role.split_keys) : L;
  int const tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  // The pass's capabilities (attention/capabilities.hpp), asked once. A pass with a distance band
  // lo ≤ |i − j| ≤ hi (a pattern's window and first dilation: dilated segments hold only keys in the
  // rows' phase, so the rate needs no test) masks its chunks by one range test per key instead of
  // the pass's ownership test.
  auto const view = attn::pass_view(seg, pass);
  attn::pass_traits const traits = view.traits(seg);
  bool const band = traits.has_band();
  int const band_lo = traits.band_lo, band_len = traits.band_hi - traits.band_lo;
  T const* const qb = p.q + b * p.qs.batch + h * p.qs.head;
  T const* const kb = p.k + b * p.ks.batch + h * p.ks.head;
  T const* const vb = p.v + b * p.vs.batch + h * p.vs.head;

  for (int r0 = 0; r0 < all_rows.count; r0 += BM) {
    attn::index_range const rows = all_rows.sub(r0, min(BM, all_rows.count - r0));
    int const cnt = rows.count;
    // This thread's two rows (fragment rows g and g + 8 of its warp).
    int const lr[2] = {warp * 16 + g, warp * 16 + g + 8};
    int row_id[2];
    bool row_live[2];  // a row of the tile that this pass may own keys for
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      row_id[x] = lr[x] < cnt ? rows[lr[x]] : 0;
      row_live[x] = lr[x] < cnt && view.live_row(seg, row_id[x]);
    }
    // The running state: fresh on the first pass of these rows, else the previous pass's.
    float m[2], l[2], acc[D / 8][4];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      m[x] = -INFINITY;
      l[x] = 0.f;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) acc[dt][2 * x] = acc[dt][2 * x + 1] = 0.f;
      cuda_cta_role const rd = cuda_role(p);
      if (!rd.first && lr[x] < cnt) {
        std::int64_t const sr = cuda_state_row(p, rd, b, h, row_id[x], t * BM + r0 + lr[x]);
        m[x] = p.st_m[sr];
        if (tig == 0) l[x] = p.st_l[sr];
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
          float2 const v = *reinterpret_cast<float2 const*>(p.st_acc + sr * D + dt * 8 + tig * 2);
          acc[dt][2 * x] = v.x;
          acc[dt][2 * x + 1] = v.y;
        }
      }
    }

    cuda_load_q<BM, D, NT>(sq, qb, p.qs.seq, cnt, [&](int r) -> std::int64_t { return unsigned(rows[r]); });
    bool q_ready = false;  // Q's fragments, loaded once per tile (on targets that keep them in registers)
    typename mma::q_frags qf;

    for (int skip = 0;; skip += cuda_segment_batch) {
      if (tid == 0) {  // the segments form one stream of keys, cut into chunks of BN
        std::int64_t const at = std::int64_t(p.table_size == 1 ? 0 : h - p.head0) * p.seg_tiles + t;
        bool const co = cuda_role(p).co;
        int const n = p.seg_table && !co && skip == 0 ? p.seg_count[at] : -1;
        if (n >= 0) {  // resolved before the launch: clip to this batch's keys, lay out the stream
          cuda_segment const* const src = p.seg_table + at * cuda_segment_batch;
          int out = 0;
          for (int s = 0; s < n; ++s) {
            cuda_segment sg = src[s];
            int const c = key_hi < p.seq ? sg.keys.count_below(key_hi) : sg.keys.count;
            if (c <= 0) continue;
            sg.keys.count = c;
            segs[out++] = sg;
          }
          n_segs = seen = out;
          cuda_layout_segments(segs, out, BN, seg_start, &tail_chunk);
        } else {
          cuda_collect_segments(seg, pass, t, cuda_role(p).tail_global, BN, segs, &n_segs, &seen, seg_start, &tail_chunk,
                                skip, key_lo, key_hi);
        }
      }
      __syncthreads();
      int const ns = n_segs;
      bool const more = seen > skip + cuda_segment_batch;
      int const total_keys = seg_start[ns];
      int const total = (total_keys + BN - 1) / BN;

      // Chunk c: keys c·BN .. of the stream. Its key indices and exactness are resolved once, S chunks
      // ahead, into slot c % 4 (the first BN threads, one key each: whole warps, which vote on
      // exactness), so the copies and the mask only read them.
      static_assert(BN % 32 == 0 && BN <= NT, "attention: whole warps resolve a chunk's keys");
      auto fill_keys = [&](int c) {
        if (tid >= BN) return;
        int const slot = c & 3, gk = c * BN + tid;
        int j = cuda_no_key;
        bool ex = false;  // a key of an exact segment (a slot with no key needs the mask)
        if (gk < total_keys) {
          int lo = 0;  // the last segment starting at or before gk
          while (seg_start[lo + 1] <= gk) ++lo;
          int const o = gk - seg_start[lo];
          if (o < segs[lo].keys.count) {  // else: the gap before the tail
            j = segs[lo].keys[o];
            ex = segs[lo].exact != 0;
          }
        }
        kidx[slot][tid] = j;
        bool const all = __all_sync(0xffffffffu, ex);
        if (lane == 0) reinterpret_cast<unsigned char*>(&kexact[slot])[warp] = all ? 1 : 0;
      };
      auto load_chunk = [&](int stage, int c) {  // K/V rows gathered by key index
        T* const dk = sk + stage * BN * D;
        T* const dv = sv + stage * BN * D;
        int const* const kx = kidx[c & 3];
        static_assert(BN * CH % NT == 0, "attention: every thread copies the same number of 16-byte pieces");
#pragma unroll
        for (int i = 0; i < BN * CH / NT; ++i) {  // a fixed trip count: unrolled without branches
          int const idx = tid + i * NT, r = idx / CH, ch = idx % CH, j = kx[r];
          std::int64_t const row = unsigned(max(j, 0));  // zero-extended; an empty slot reads key 0, copies zeros
          int const bytes = j >= 0 ? 16 : 0;
          cp_async_16(dk + cuda_swz<BN>(r, ch), kb + row * p.ks.seq + ch * 8, bytes);
          cp_async_16(dv + cuda_swz<BN>(r, ch), vb + row * p.vs.seq + ch * 8, bytes);
        }
      };
      for (int c = 0; c < S && c < total; ++c) fill_keys(c);
      __syncthreads();
      auto ahead = [&](int c) {
        if (c + S < total) fill_keys(c + S);
      };
      // (bytes of kexact past BN / 32 are never written)
      auto exact = [&](int c) { return (kexact[c & 3] & exact_all) == exact_all; };
      auto mask = [&](int c, float (&s)[BN / 8][4], float (&mx)[2]) {
        int const* const keys = kidx[c & 3];
        float const sc = p.scale_log2;
        if (band && c < tail_chunk) {
          int lo[2];  // rows this pass does not own get a bound no distance reaches
#pragma unroll
          for (int x = 0; x < 2; ++x) lo[x] = row_live[x] ? band_lo : 0x60000000;
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt) {
            int2 const j2 = *reinterpret_cast<int2 const*>(keys + nt * 8 + tig * 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              int const x = e / 2, j = (e & 1) ? j2.y : j2.x;
              bool const ok = unsigned(abs(row_id[x] - j) - lo[x]) <= unsigned(band_len);
              s[nt][e] = ok ? s[nt][e] * sc : -INFINITY;
              mx[x] = fmaxf(mx[x], s[nt][e]);
            }
          }
        } else {
          // The chunks of the key tail belong to the pass that rides with this one.
          auto const owner = !attn::has_tail_segment_v<Seg> || c < tail_chunk ? view : view.tail();
#pragma unroll
          for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              int const x = e / 2, j = keys[nt * 8 + tig * 2 + (e & 1)];
              bool const ok = j >= 0 && row_live[x] && owner.owns_key(seg, row_id[x], j);
              s[nt][e] = ok ? s[nt][e] * sc : -INFINITY;
              mx[x] = fmaxf(mx[x], s[nt][e]);
            }
        }
      };
      cuda_attention_mainloop<mma, T, D, BM, BN, S>(sq, sk, sv, total, p.scale_log2, load_chunk, ahead, exact, mask, qf,
                                                    q_ready, m, l, acc);
      __syncthreads();
      if (!more) break;
    }

    // Write back: the output (last pass) or the running state.
    cuda_write_back<D>(
        p, cuda_role(p), b, h, lr, cnt, [&](int x) { return rows[lr[x]]; },
        [&](int x) { return t * BM + r0 + lr[x]; }, m, l, acc);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// Band kernel: a pass whose tiles see one run of keys (attn::pass_traits::one_run: a pattern's window
// pass) when it is the first pass of its rows and carries no key tail. A tile of 64 consecutive rows
// [r0, r0 + cnt) sees the consecutive keys [r0 − w, r0 + cnt − 1 + w] ∩ [0, L), so its chunks are
// found, copied and masked by arithmetic: no segment table, no key indices in shared memory, and the
// mask only where the band's edges or the keys' end cut through a chunk. The first pre_ctas CTAs of
// its launch run the segment pre-pass of the passes that follow.

template <class T, int D, int S, class Seg>
DRDIFF_KERNEL void __launch_bounds__(128, cuda_attention_min_blocks(D, 4))
    attention_band_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p) {
  constexpr int BM = 64, BN = cuda_attention_bn, CH = D / 8, NT = 128;
  using mma = cuda_mma_step<T, D, BM, BN>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sq = mma::tile_base(smem_raw);
  T* const sk = sq + BM * D;
  T* const sv = sk + S * BN * D;

  int b, h;
  cuda_bh(p, b, h);
  if (int(blockIdx.x) < p.pre_ctas) {  // a block of the segment pre-pass for the later passes
    if (int(blockIdx.y) < p.table_size)
      cuda_resolve_segments(p, p.pre, p.pre_table, p.pre_count, int(blockIdx.x) / p.pre_blocks,
                            int(blockIdx.x) % p.pre_blocks * NT + int(threadIdx.x), int(blockIdx.y));
    return;
  }
  Seg const& pt = p.table[p.table_size == 1 ? 0 : h - p.head0];
  int const t = int(blockIdx.x) - p.pre_ctas;
  if (t >= pt.num_q_tiles(p.pass)) return;
  attn::index_range const rows = pt.q_tile(p.pass, t);  // consecutive rows, at most 64 (the tile)
  int const cnt = rows.count, r0 = rows.start;
  if (cnt <= 0) return;
  auto const view = attn::pass_view(pt, p.pass);
  // Keys stop at the batch's length, kept within [0, seq] (device lengths are not checked on the host).
  int const L = p.kv_lens ? min(max(p.kv_lens[b], 0), p.seq) : p.seq;
  // Rows run to seq even when keys stop at L, so only seq bounds the reach (and keeps the sums below
  // from overflowing).
  int const w = min(view.traits(pt).band_hi, p.seq);
  int const k_lo = max(0, r0 - w), k_hi = min(L, r0 + cnt + w);  // the tile's keys [k_lo, k_hi)
  int const total = k_hi > k_lo ? (k_hi - k_lo + BN - 1) / BN : 0;
  int const tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  (void)lane;
  int const lr[2] = {warp * 16 + g, warp * 16 + g + 8};
  int row_id[2];
  bool row_live[2];  // a row of the tile that this pass owns keys for (not a global row)
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    row_id[x] = r0 + lr[x];
    row_live[x] = lr[x] < cnt && view.live_row(pt, row_id[x]);
  }
  // A chunk is exact when every row of the tile is live and the band covers it for every row.
  bool const all_live = __syncthreads_and((lr[0] >= cnt || row_live[0]) && (lr[1] >= cnt || row_live[1])) != 0;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f}, acc[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[dt][e] = 0.f;

  T const* const qb = p.q + b * p.qs.batch + h * p.qs.head;
  T const* const kb = p.k + b * p.ks.batch + h * p.ks.head;
  T const* const vb = p.v + b * p.vs.batch + h * p.vs.head;
  cuda_load_q<BM, D, NT>(sq, qb, p.qs.seq, cnt, [&](int r) -> std::int64_t { return r0 + r; });
  typename mma::q_frags qf;
  bool q_ready = false;
  // This thread's pieces: rows tid / CH + i·(NT / CH) of a chunk, 16-byte column tid % CH. The source
  // rows advance by BN keys per chunk (chunks load in order), so the copy adds a stride.
  static_assert(BN * CH % NT == 0, "attention: every thread copies the same number of pieces");
  T const* kp = kb + std::int64_t(k_lo + tid / CH) * p.ks.seq + (tid % CH) * 8;
  T const* vp = vb + std::int64_t(k_lo + tid / CH) * p.vs.seq + (tid % CH) * 8;
  std::int64_t const kstep = std::int64_t(NT / CH) * p.ks.seq, vstep = std::int64_t(NT / CH) * p.vs.seq;
  auto load_chunk = [&](int stage, int c) {  // keys k_lo + c·BN + r; past k_hi: zeros (from row k_lo)
    T* const dk = sk + stage * BN * D;
    T* const dv = sv + stage * BN * D;
    bool const full = k_lo + (c + 1) * BN <= k_hi;
#pragma unroll
    for (int i = 0; i < BN * CH / NT; ++i) {
      int const idx = tid + i * NT, r = idx / CH, ch = idx % CH;
      bool const in = full || k_lo + c * BN + r < k_hi;
      cp_async_16(dk + cuda_swz<BN>(r, ch), in ? kp + i * kstep : kb + ch * 8 + std::int64_t(k_lo) * p.ks.seq, in ? 16 : 0);
      cp_async_16(dv + cuda_swz<BN>(r, ch), in ? vp + i * vstep : vb + ch * 8 + std::int64_t(k_lo) * p.vs.seq, in ? 16 : 0);
    }
    kp += BN / (NT / CH) * kstep;
    vp += BN / (NT / CH) * vstep;
  };
  auto ahead = [](int) {};  // (keys are found by arithmetic)
  auto exact = [&](int c) {
    int const j0 = k_lo + c * BN;
    return all_live && j0 + BN <= k_hi && j0 >= r0 + cnt - 1 - w && j0 + BN - 1 <= r0 + w;
  };
  auto mask = [&](int c, float (&s)[BN / 8][4], float (&mx)[2]) {
    // Row x owns the chunk's columns lo .. hi (keys i − w .. min(i + w, k_hi − 1)); column
    // nt·8 + tig·2 + e % 2 is in when nt·8 + e % 2 − (lo − tig·2) ≤ hi − lo, unsigned.
    int const j0 = k_lo + c * BN;
    int base[2], len[2];
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      int const lo = row_id[x] - w - j0, hi = min(row_id[x] + w, k_hi - 1) - j0;
      bool const any = row_live[x] && hi >= lo;
      base[x] = any ? lo - tig * 2 : 1 << 20;  // (none: every column is far below)
      len[x] = any ? hi - lo : 0;
    }
    float const sc = p.scale_log2;
#pragma unroll
    for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int const x = e / 2;
        bool const ok = unsigned(nt * 8 + (e & 1) - base[x]) <= unsigned(len[x]);
        s[nt][e] = ok ? s[nt][e] * sc : -INFINITY;
        mx[x] = fmaxf(mx[x], s[nt][e]);
      }
  };
  cuda_attention_mainloop<mma, T, D, BM, BN, S>(sq, sk, sv, total, p.scale_log2, load_chunk, ahead, exact, mask, qf,
                                                q_ready, m, l, acc);

  cuda_cta_role wb{};  // the first pass of its rows, never a key split
  wb.last = p.last != 0;
  cuda_write_back<D>(
      p, wb, b, h, lr, cnt, [&](int x) { return row_id[x]; }, [](int) { return 0; }, m, l, acc);
}

}  // namespace detail
DRDIFF_NAMESPACE_END
