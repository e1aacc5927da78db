#pragma once
/// \file
/// The other attention kernels: the SIMT kernel (fp32, any supported head_dim; meant for testing: one
/// thread per query row, keys staged 16 at a time, the same passes, segments and running state as the
/// tensor-core kernels) and the merge of a key-split pass's partial states by log-sum-exp.

#include <drdiff/attention/index_range.hpp>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/detail/mma.cuh>
#include <drdiff/cuda/kernels/attention_segments.cuh>
#include <drdiff/cuda/launch.cuh>

#include <cuda_runtime.h>

#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

// ---------------------------------------------------------------------------------------------------
// SIMT kernel (fp32, any supported head_dim): one thread per query row, keys staged 16 at a time.

/// The SIMT kernels' walk over the keys of tile t of `pass`: its segments, clipped to [key_lo, key_hi)
/// and collected by thread 0 in batches, have their keys staged 16 at a time as fp32 rows of K and V
/// in shared memory (sk, sv: 16 × D each; key_idx: the keys); f(kc, exact) then runs in every thread
/// on each staged group of kc keys, between two barriers.
template <int BN, class T, class Seg, class F>
__device__ __forceinline__ void cuda_simt_key_walk(Seg const& seg, int pass, int t, int key_lo, int key_hi, T const* kb,
                                                   std::int64_t k_seq, T const* vb, std::int64_t v_seq, int D,
                                                   float* sk, float* sv, int* key_idx, cuda_segment* segs,
                                                   int* n_segs, int* seen, F&& f) {
  int const tid = threadIdx.x;
  for (int skip = 0;; skip += cuda_segment_batch) {
    if (tid == 0) {
      *n_segs = 0;
      *seen = 0;
      seg.for_each_segment(pass, t, cuda_segment_collector{segs, n_segs, seen, skip, key_lo, key_hi});
    }
    __syncthreads();
    int const ns = *n_segs;
    bool const more = *seen > skip + cuda_segment_batch;
    for (int s = 0; s < ns; ++s) {
      cuda_segment const sg = segs[s];
      for (int off = 0; off < sg.keys.count; off += BN) {
        int const kc = min(BN, sg.keys.count - off);
        attn::index_range const kr = sg.keys.sub(off, kc);
        for (int idx = tid; idx < BN * D; idx += blockDim.x) {
          int const r = idx / D, d = idx % D;
          std::int64_t const j = r < kc ? kr[r] : 0;
          sk[idx] = r < kc ? float(kb[j * k_seq + d]) : 0.f;
          sv[idx] = r < kc ? float(vb[j * v_seq + d]) : 0.f;
          if (d == 0) key_idx[r] = int(j);
        }
        __syncthreads();
        f(kc, sg.exact != 0);
        __syncthreads();
      }
    }
    if (!more) break;
  }
}

template <class T, class Seg>
DRDIFF_KERNEL void __launch_bounds__(64) attention_simt_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p) {
  constexpr int BM = 64, BN = 16, DMAX = 256;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  float* const sk = reinterpret_cast<float*>(smem_raw);  // BN × dim
  float* const sv = sk + BN * p.dim;
  __shared__ __align__(16) unsigned char segs_raw[sizeof(cuda_segment) * cuda_segment_batch];
  auto* const segs = reinterpret_cast<cuda_segment*>(segs_raw);  // (index_range has a constructor)
  __shared__ int n_segs, seen;
  __shared__ int key_idx[BN];

  int b, h;
  cuda_bh(p, b, h);
  Seg const& seg = p.table[p.table_size == 1 ? 0 : h - p.head0];
  cuda_cta_role const role = cuda_role(p);  // (the SIMT path is never co-launched)
  int const t = role.t, pass = role.pass, D = p.dim, tid = threadIdx.x;
  if (t >= seg.num_q_tiles(pass)) return;  // past this head's tiles (another head in the launch has more)
  attn::index_range const all_rows = seg.q_tile(pass, t);
  if (all_rows.count <= 0) return;
  // Keys stop at the batch's length, kept within [0, seq] (device lengths are not checked on the host).
  int const L = p.kv_lens ? min(max(p.kv_lens[b], 0), p.seq) : p.seq;
  int const key_lo = role.split_keys > 0 ? role.split * role.split_keys : 0;
  int const key_hi = role.split_keys > 0 ? min(L, key_lo + role.split_keys) : L;
  T const* const qb = p.q + b * p.qs.batch + h * p.qs.head;
  T const* const kb = p.k + b * p.ks.batch + h * p.ks.head;
  T const* const vb = p.v + b * p.vs.batch + h * p.vs.head;

  for (int r0 = 0; r0 < all_rows.count; r0 += BM) {
    attn::index_range const rows = all_rows.sub(r0, min(BM, all_rows.count - r0));
    bool const active = tid < rows.count;
    int const row = active ? rows[tid] : 0;
    float q[DMAX], acc[DMAX];
    float m = -INFINITY, l = 0.f;
    std::int64_t const sr = cuda_state_row(p, role, b, h, row, t * BM + r0 + tid);
    for (int d = 0; d < D; ++d) {
      q[d] = active ? float(qb[std::int64_t(row) * p.qs.seq + d]) : 0.f;
      acc[d] = active && !role.first ? p.st_acc[sr * D + d] : 0.f;
    }
    if (active && !role.first) {
      m = p.st_m[sr];
      l = p.st_l[sr];
    }
    cuda_simt_key_walk<BN>(seg, pass, t, key_lo, key_hi, kb, p.ks.seq, vb, p.vs.seq, D, sk, sv, key_idx, segs, &n_segs,
                           &seen, [&](int kc, bool exact) {
      if (!active) return;
      for (int r = 0; r < kc; ++r) {
        if (!exact && !seg.owns(pass, row, key_idx[r])) continue;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += q[d] * sk[r * D + d];
        float const sc = dot * p.scale_log2;
        float const m_new = fmaxf(m, sc);
        float const alpha = exp2f(m - m_new), pr = exp2f(sc - m_new);
        l = l * alpha + pr;
        for (int d = 0; d < D; ++d) acc[d] = acc[d] * alpha + pr * sv[r * D + d];
        m = m_new;
      }
    });
    if (!active) continue;
    if (role.last && role.split_keys == 0) {
      float const inv = cuda_row_inverse(l);
      T* const o = p.o + b * p.os.batch + std::int64_t(row) * p.os.seq + h * p.os.head;
      for (int d = 0; d < D; ++d) o[d] = T(acc[d] * inv);
      if (p.lse) p.lse[(std::int64_t(b) * p.heads + h) * p.seq + row] =
                     cuda_row_lse(m, l);
    } else {
      float* const pm = role.split_keys > 0 ? p.part_m : p.st_m;
      float* const pl = role.split_keys > 0 ? p.part_l : p.st_l;
      float* const pa = role.split_keys > 0 ? p.part_acc : p.st_acc;
      pm[sr] = m;
      pl[sr] = l;
      for (int d = 0; d < D; ++d) pa[sr * D + d] = acc[d];
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Merge of the key-split partial states of a pass (global rows): one block per (row, batch·head).

template <class T, class Seg>
DRDIFF_KERNEL void attention_merge_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p, int splits) {
  int const pr = blockIdx.x;  // row of the split pass
  int b, h;
  cuda_bh(p, b, h);
  Seg const& seg = p.table[p.table_size == 1 ? 0 : h - p.head0];
  int const t = pr / p.tile_rows, r = pr % p.tile_rows;
  if (t >= seg.num_q_tiles(p.pass)) return;
  attn::index_range const rows = seg.q_tile(p.pass, t);
  if (r >= rows.count) return;
  int const row = rows[r];
  std::int64_t const bh = std::int64_t(b) * p.heads + h;
  auto at = [&](int z) { return (std::int64_t(z) * p.batch * p.heads + bh) * p.part_rows + pr; };
  __shared__ float w[cuda_max_splits];  // weight of split z: 2^(m_z − max), 0 for a split with no key
  __shared__ float inv_l;
  if (threadIdx.x < 32) {  // one warp weighs the splits: lane z and z + 32
    int const lane = int(threadIdx.x);
    float m2[2] = {-INFINITY, -INFINITY}, l2[2] = {0.f, 0.f};
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      int const z = lane + 32 * k;
      if (z < splits) {
        m2[k] = p.part_m[at(z)];
        l2[k] = p.part_l[at(z)];
      }
    }
    float mx = fmaxf(m2[0], m2[1]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float l = 0.f;
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      float const wz = m2[k] == -INFINITY ? 0.f : exp2f(m2[k] - mx);
      if (lane + 32 * k < splits) w[lane + 32 * k] = wz;
      l += l2[k] * wz;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
    if (lane == 0) {
      inv_l = cuda_row_inverse(l);
      if (p.lse) p.lse[bh * p.seq + row] = cuda_row_lse(mx, l);
    }
  }
  __syncthreads();
  float const inv = inv_l;
  T* const o = p.o + b * p.os.batch + std::int64_t(row) * p.os.seq + h * p.os.head;
  for (int d = threadIdx.x; d < p.dim; d += blockDim.x) {
    float a = 0.f;
#pragma unroll 4
    for (int z = 0; z < splits; ++z)
      if (w[z] != 0.f) a += p.part_acc[at(z) * p.dim + d] * w[z];
    o[d] = cuda_from_float<T>(a * inv);
  }
}

}  // namespace detail
DRDIFF_NAMESPACE_END
