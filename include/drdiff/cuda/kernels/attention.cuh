#pragma once
/// \file
/// CUDA attention kernels. One CTA runs one query tile of one pass of one (batch, head): it takes
/// the tile's key segments (resolved by a pre-pass kernel, or by the policy's visitor run by one
/// thread), then walks them in chunks of 64 keys (cuda_attention_bn) with the online softmax. 16-bit types use tensor
/// cores: warpgroup MMA (wgmma) when compiled for sm_90a, mma.sync m16n8k16 with ldmatrix elsewhere;
/// K/V arrive through two or three cp.async stages. fp32 runs a SIMT kernel meant for testing. Global-row
/// passes are split across key ranges and merged by log-sum-exp.

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/index_range.hpp>
#include <drdiff/attention/pattern.hpp>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/detail/mma.cuh>

#include <cuda_runtime.h>

#include <cfloat>
#include <climits>
#include <cstdint>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Bound policies passed to one launch: one shared by every head, or one per head.
inline constexpr int cuda_table_heads = 16;
/// K/V shared-memory stages of the tensor-core kernel: 3 (chunk c + 2 loads while chunk c computes),
/// or 2 where 3 do not fit the device's shared memory (head_dim 128 on GPUs with 99 KB per block).
inline constexpr int cuda_attention_max_stages = 3;
/// Sequence lengths the kernels index (distances stay clear of the empty-slot sentinel below).
inline constexpr int cuda_attention_max_seq = (1 << 29) - 1;

/// Warps of the tensor-core kernel (a template parameter, 4 or 8); each owns 16 query rows of the
/// tile (on sm_90a each group of 4 warps is a warpgroup owning 64 rows). The rows of a tile share
/// every K/V chunk loaded, so 8 warps halve the K/V traffic per row, but their warpgroups wait for each
/// other at every chunk's barrier. The host picks 8 for dense patterns and 4 for the rest, where
/// tiles have few chunks and four independent CTAs per SM overlap one another's softmax and MMAs
/// better (H100, docs/benchmarks.md: dense 16K 3.15 ms with 8 warps vs 3.52 with 4; local 0.208 vs
/// 0.190 ms, the HSA mask 0.637 vs 0.612 ms). Defining DRDIFF_CUDA_ATTENTION_WARPS (4 or 8) forces
/// one size for every pattern.
#ifdef DRDIFF_CUDA_ATTENTION_WARPS
static_assert(DRDIFF_CUDA_ATTENTION_WARPS == 4 || DRDIFF_CUDA_ATTENTION_WARPS == 8,
              "DRDIFF_CUDA_ATTENTION_WARPS must be 4 or 8 (64 or 128 query rows per tile)");
#endif
/// Keys per chunk of the tensor-core kernel (one barrier, one max/sum reduction and two MMA waits per
/// chunk; 128 measured slower on H100 at every occupancy, docs/benchmarks.md).
inline constexpr int cuda_attention_bn = 64;
/// Resident CTAs per SM the tensor-core kernel is compiled for, by head_dim and warps: it caps the
/// registers (65536 / (32 · warps · blocks)) at 128 for head_dim 64 and 255 for 128, and occupancy
/// is what hides the latency of this kernel's short chunks (measured on H100 with the mma.sync path
/// and 4 warps: 128 registers and 4 CTAs ran local attention 1.7× faster than 216 and 2).
/// DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D64 / _D128 override it (tuning).
constexpr int cuda_attention_min_blocks(int d, int warps) {
#ifdef DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D64
  if (d <= 64) return DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D64;
#endif
#ifdef DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D128
  if (d > 64) return DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D128;
#endif
  return d <= 64 ? 16 / warps : 8 / warps;
}

/// A tile's key segment. `exact`: every pair (row of the tile, key) is owned by the pass. `tail`: the
/// global-key segment appended to a tile of the last ordinary pass (cuda_attention_params::
/// tail_global); it starts a new chunk of the key stream, so a chunk holds keys of one pass only.
struct cuda_segment {
  attn::index_range keys;
  int exact;
  int tail;
};

/// The ordinary passes whose segment tables one attention_segments_kernel launch resolves.
struct cuda_segment_passes {
  static constexpr int max = 8;  // window + 4 dilations + global keys, with room
  int n = 0;
  int pass[max] = {}, tail[max] = {}, tiles[max] = {};
  std::int64_t offset[max] = {};  ///< the pass's first table entry (entry e, tile t: offset + e·tiles + t)
};

template <class T, class Seg>
struct cuda_attention_params {
  using lse_t = typename attention_args<T>::lse_type;
  Seg table[cuda_table_heads];
  int table_size = 1;  ///< 1: table[0] for all heads; else heads head0 .. head0 + table_size − 1
  int head0 = 0;
  int heads_in_launch = 1;
  int tile_rows = 64;  ///< query rows per tile (the bound pattern's `tile`)
  int pass = 0;
  int first = 1, last = 1;  ///< first pass of its rows (fresh state) / last one (write O and lse)
  int batch = 0, seq = 0, heads = 0, dim = 0;
  T const* q = nullptr;
  T const* k = nullptr;
  T const* v = nullptr;
  T* o = nullptr;
  tensor_strides qs{}, ks{}, vs{}, os{};
  lse_t* lse = nullptr;
  int const* kv_lens = nullptr;
  float scale_log2 = 0.f;  ///< softmax scale · log2(e): scores are kept in base 2
  float* st_m = nullptr;   ///< running state between passes: [batch·heads·seq] (base-2 max)
  float* st_l = nullptr;
  float* st_acc = nullptr;  ///< [batch·heads·seq·dim]
  int split_keys = 0;       ///< > 0: blockIdx.z covers keys [z·split_keys, (z+1)·split_keys)
  /// 1: this pass also runs the global-key pass for its rows (attn::pattern only): each tile's stream
  /// ends with the global-key segment, so that pass needs no launch and no state round trip.
  int tail_global = 0;
  int part_rows = 0;        ///< rows of the split pass per (batch, head)
  float* part_m = nullptr;  ///< [splits][batch·heads][part_rows]
  float* part_l = nullptr;
  float* part_acc = nullptr;  ///< [splits][batch·heads][part_rows][dim]
  /// Key segments of every tile of this pass, resolved before the launch (attention_segments_kernel):
  /// seg_table[(entry · seg_tiles + t) · cuda_segment_batch + s], seg_count[entry · seg_tiles + t]
  /// (−1: more than a batch; the kernel then collects them itself). Null: always collect.
  cuda_segment const* seg_table = nullptr;
  int const* seg_count = nullptr;
  int seg_tiles = 0;
  /// Key splits of a global-row pass launched with this one (tensor-core kernel): CTAs blockIdx.x <
  /// co_ctas run split blockIdx.x / co_tiles of tile blockIdx.x % co_tiles of pass co_pass (keys of
  /// co_split_keys each, into the split partials); the others run tile blockIdx.x − co_ctas of `pass`.
  /// The long split CTAs start first and the pass's short tiles fill in around them.
  int co_ctas = 0, co_tiles = 1, co_pass = 0, co_split_keys = 0;
  /// The segment pre-pass run by the first pre_ctas CTAs of a band-kernel launch (of 128 threads, the
  /// pre-pass's block; blockIdx.x = pass · pre_blocks + block, blockIdx.y = table entry), which fills
  /// the tables of the passes that follow while the band kernel's own tiles run.
  cuda_segment_passes pre{};
  cuda_segment* pre_table = nullptr;
  int* pre_count = nullptr;
  int pre_ctas = 0, pre_blocks = 1;
};

/// What one CTA runs: a tile of the launch's pass, or a key split of the co-launched global-row pass.
struct cuda_cta_role {
  int t = 0, pass = 0;
  int split = 0, split_keys = 0;  ///< split_keys > 0: keys [split·split_keys, (split+1)·split_keys)
  bool first = true, last = true, tail_global = false;
  bool co = false;  ///< a co-launched split CTA (no segment table: it collects its own)
};

/// blockIdx.x read by an instruction the compiler may not merge with earlier reads: the kernel derives
/// its role again where it needs it instead of keeping it in registers across the main loop.
__device__ __forceinline__ int cuda_cta_x() {
  int x;
  asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(x));
  return x;
}

template <class P>
__device__ inline cuda_cta_role cuda_role(P const& p) {
  cuda_cta_role r;
  int const x = cuda_cta_x();
  if (x < p.co_ctas) {
    r.co = true;
    r.t = x % p.co_tiles;
    r.split = x / p.co_tiles;
    r.pass = p.co_pass;
    r.split_keys = p.co_split_keys;
    return r;
  }
  r.t = x - p.co_ctas;
  r.pass = p.pass;
  r.split = int(blockIdx.z);
  r.split_keys = p.split_keys;
  r.first = p.first != 0;
  r.last = p.last != 0;
  r.tail_global = p.tail_global != 0;
  return r;
}

inline constexpr int cuda_segment_batch = 32;
/// Key index of an empty slot of a chunk: far below every key, so |i − j| exceeds any reach.
inline constexpr int cuda_no_key = -(1 << 30);

/// Collects segments number skip .. skip + 31 of a tile, clipped to keys [lo, hi).
struct cuda_segment_collector {
  cuda_segment* out;
  int* n_out;
  int* seen;
  int skip, lo, hi;
  int tail = 0;  ///< marks the segments collected (the global-key tail)
  __device__ void operator()(attn::index_range keys, bool exact) const {
    int const a = lo <= 0 ? 0 : keys.count_below(lo);
    int const b = keys.count_below(hi);
    if (b <= a) return;
    int const idx = (*seen)++;
    if (idx < skip || idx >= skip + cuda_segment_batch) return;
    out[idx - skip] = cuda_segment{keys.sub(a, b - a), exact ? 1 : 0, tail};
    ++*n_out;
  }
};

/// Calls `f` on the key segments of tile t of pass `pass`, then, with `tail`, on the global-key
/// segment of the same rows (marked as the tail).
template <class Seg>
__device__ inline void cuda_visit_segments(Seg const& seg, int pass, int t, bool tail, cuda_segment_collector f) {
  seg.for_each_segment(pass, t, f);
  if constexpr (std::is_same_v<Seg, attn::pattern>) {
    if (tail) {
      attn::index_range const rows = seg.q_tile(pass, t);
      f.tail = 1;
      if (!rows.empty()) seg.global_key_segment(rows, f);
    }
  }
}

/// Lays segments out as one stream of keys: seg_start[s] is the stream position of segment s, and
/// seg_start[n] the stream's length. The tail segment starts at the next multiple of `chunk`
/// (positions in the gap hold no key); *tail_chunk receives its first chunk (INT_MAX: no tail).
__device__ inline void cuda_layout_segments(cuda_segment const* segs, int n, int chunk, int* seg_start,
                                            int* tail_chunk) {
  int keys = 0;
  *tail_chunk = INT_MAX;
  for (int s = 0; s < n; ++s) {
    if (segs[s].tail) {
      keys = (keys + chunk - 1) / chunk * chunk;
      *tail_chunk = keys / chunk;
    }
    seg_start[s] = keys;
    keys += segs[s].keys.count;
  }
  seg_start[n] = keys;
}

/// Runs the tile's segment visitor (one thread) and lays the collected segments out as one stream of
/// keys. Kept out of line so the visitor's registers do not count against the kernel's main loop.
template <class Seg>
__device__ __noinline__ void cuda_collect_segments(Seg const& seg, int pass, int t, bool tail, int chunk,
                                                   cuda_segment* segs, int* n_segs, int* seen, int* seg_start,
                                                   int* tail_chunk, int skip, int lo, int hi) {
  *n_segs = 0;
  *seen = 0;
  cuda_visit_segments(seg, pass, t, tail, cuda_segment_collector{segs, n_segs, seen, skip, lo, hi});
  cuda_layout_segments(segs, *n_segs, chunk, seg_start, tail_chunk);
}

/// Resolves the key segments of every query tile of the listed passes (one thread per pass, tile and
/// table entry; blockIdx.z is the pass) into the tables the attention kernel reads: the single-thread
/// visitor then runs once per tile for all batches and heads, in parallel, in one launch for the
/// whole call, instead of inside every CTA while its other threads wait.
template <class T, class Seg>
__device__ inline void cuda_resolve_segments(cuda_attention_params<T, Seg> const& p, cuda_segment_passes const& ps,
                                             cuda_segment* table, int* count, int i, int t, int e) {
  if (t >= ps.tiles[i]) return;
  std::int64_t const at = ps.offset[i] + std::int64_t(e) * ps.tiles[i] + t;
  if (t >= p.table[e].num_q_tiles(ps.pass[i])) {  // past this head's tiles (another head has more)
    count[at] = 0;
    return;
  }
  int n = 0, seen = 0;
  cuda_visit_segments(p.table[e], ps.pass[i], t, ps.tail[i] != 0,
                      cuda_segment_collector{table + at * cuda_segment_batch, &n, &seen, 0, 0, p.seq});
  count[at] = seen > cuda_segment_batch ? -1 : n;
}
template <class T, class Seg>
__global__ void attention_segments_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p,
                                          const cuda_segment_passes ps, cuda_segment* table, int* count) {
  cuda_resolve_segments(p, ps, table, count, int(blockIdx.z), int(blockIdx.x * blockDim.x + threadIdx.x),
                        int(blockIdx.y));
}

template <class P>
__device__ inline void cuda_bh(P const& p, int& b, int& h) {
  b = blockIdx.y / p.heads_in_launch;
  h = p.head0 + blockIdx.y % p.heads_in_launch;
}

/// Where the running state of (batch, head, row) lives: the split partials or the pass state.
template <class P>
__device__ inline std::int64_t cuda_state_row(P const& p, cuda_cta_role const& r, int b, int h, int row, int part_row) {
  if (r.split_keys > 0)
    return (std::int64_t(r.split) * p.batch * p.heads + std::int64_t(b) * p.heads + h) * p.part_rows + part_row;
  return (std::int64_t(b) * p.heads + h) * p.seq + row;
}

/// The first tile of the dynamic shared memory: on sm_90a at the next 1024-byte boundary (the 128-byte
/// swizzle's period; the host adds the slack).
template <class T>
__device__ __forceinline__ T* cuda_tile_base(unsigned char* raw) {
#if DRDIFF_WGMMA
  return reinterpret_cast<T*>(raw + ((1024 - (smem_u32(raw) & 1023)) & 1023));
#else
  return reinterpret_cast<T*>(raw);
#endif
}

/// Q as mma.sync A fragments, loaded once per tile (the wgmma path reads Q from shared memory).
template <int D>
struct cuda_q_frags {
#if !DRDIFF_WGMMA
  unsigned f[D / 16][4];
#endif
};

/// Row r, 16-byte chunk c of a tile of R rows × D columns, stored as D / 64 panels of R × 64 (128-byte
/// rows) with chunk c of row r at chunk c ^ (r % 8): the wgmma 128-byte swizzle layout, and
/// conflict-free for ldmatrix.
template <int R>
__device__ __forceinline__ int cuda_swz(int r, int c) {
  return ((c >> 3) * R + r) * 64 + (((c & 7) ^ (r & 7)) << 3);
}

/// One chunk of BN keys against this warp's 16 query rows of a tile of BM (a warpgroup's 64 on sm_90a):
/// S = Q·Kᵀ, the online-softmax update of the running max m (base 2), sum l and output acc, then
/// acc += P·V. K and V are the chunk's tiles in shared memory. An exact chunk (every key owned by
/// every row) skips the mask; otherwise mask(s, mx) scales the scores by sc (the softmax scale in
/// base 2), sets the scores of pairs the pass does not own to −inf and takes each row's maximum
/// into mx.
template <class T, int D, int BM, int BN, class Mask>
__device__ __forceinline__ void cuda_attention_chunk(T const* sq, T const* ck, T const* cv, cuda_q_frags<D> const& qf,
                                                     bool exact, float sc, Mask const& mask, float (&m)[2],
                                                     float (&l)[2], float (&acc)[D / 8][4]) {
  using ops = mma16<T>;
  int const warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  (void)warp, (void)lane, (void)sq, (void)qf;
  float s[BN / 8][4];
#if DRDIFF_WGMMA
  // S = Q·Kᵀ: one warpgroup MMA per 16 columns of D, Q and K read from shared memory (K-major).
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
#else
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
#endif
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
  // O += P · V.
#if DRDIFF_WGMMA
  {  // P from registers (the A fragment layout), V from shared memory (rows of keys: transposed B)
    unsigned pa[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = ops::pack(s[2 * kk][0], s[2 * kk][1]);
      pa[kk][1] = ops::pack(s[2 * kk][2], s[2 * kk][3]);
      pa[kk][2] = ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[kk][3] = ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }
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
#else
#pragma unroll
  for (int kk = 0; kk < BN / 16; ++kk) {
    unsigned const pa[4] = {ops::pack(s[2 * kk][0], s[2 * kk][1]), ops::pack(s[2 * kk][2], s[2 * kk][3]),
                            ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                            ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      unsigned bf[4];
      ldmatrix_x4_trans(bf, cv + cuda_swz<BN>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp * 2 + (lane >> 4)));
      ops::mma(acc[2 * dp], pa, bf[0], bf[1]);
      ops::mma(acc[2 * dp + 1], pa, bf[2], bf[3]);
    }
  }
#endif
}

/// A finished row's 1/ℓ and log-sum-exp: 0 and −∞ for a row with no allowed key (ℓ = 0); NaN and NaN
/// when a NaN reached the row. (fmaxf drops a NaN score from the running max, but its exp2 makes ℓ
/// NaN, so ℓ carries it; without the last case the row's lse would read −∞, a row with no key.)
__device__ __forceinline__ float cuda_row_inverse(float l) { return l > 0.f ? 1.f / l : l == 0.f ? 0.f : l; }
__device__ __forceinline__ float cuda_row_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * 0.69314718055994531f : l == 0.f ? -INFINITY : l;
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

// ---------------------------------------------------------------------------------------------------
// Tensor-core kernel: W warps × 16 query rows, chunks of cuda_attention_bn keys, head_dim D (64 or 128).

template <class T, int D, int S, int W, class Seg>
__global__ void __launch_bounds__(32 * W, cuda_attention_min_blocks(D, W))
    attention_mma_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p) {
  static_assert(S == 2 || S == 3, "attention: 2 or 3 K/V stages (4 key slots hold chunks c .. c + S)");
  static_assert(W == 4 || W == 8, "attention: 4 or 8 warps (64 or 128 query rows per tile)");
  constexpr int BM = 16 * W, BN = cuda_attention_bn, CH = D / 8, NT = 32 * W;
  using ops = mma16<T>;
  static_assert(!DRDIFF_WGMMA || BM % 64 == 0, "attention: the wgmma path runs whole warpgroups (4 warps, 64 rows)");
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sq = cuda_tile_base<T>(smem_raw);
  T* const sk = sq + BM * D;  // S stages of BN × D
  T* const sv = sk + S * BN * D;
  __shared__ __align__(16) unsigned char segs_raw[sizeof(cuda_segment) * cuda_segment_batch];
  auto* const segs = reinterpret_cast<cuda_segment*>(segs_raw);  // (index_range has a constructor)
  __shared__ int n_segs, seen;
  __shared__ int seg_start[cuda_segment_batch + 1];
  __shared__ int tail_chunk;  // first chunk of the global-key tail (INT_MAX: none)
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
  int const L = p.kv_lens ? p.kv_lens[b] : p.seq;
  int const key_lo = role.split_keys > 0 ? role.split * role.split_keys : 0;
  int const key_hi = role.split_keys > 0 ? min(L, key_lo + role.split_keys) : L;
  int const tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  int comp = 0;
  attn::pass_kind kind = attn::pass_kind::dense_rows;
  if constexpr (std::is_same_v<Seg, attn::pattern>) kind = seg.kind(pass, &comp);
  // Window passes and the first dilation own a band of distances lo ≤ |i − j| ≤ hi (dilated segments
  // hold only keys in the rows' phase, so the rate needs no test): their masked chunks test one
  // range per key instead of running the pattern's ownership test.
  bool band = false;
  int band_lo = 0, band_len = 0;
  if constexpr (std::is_same_v<Seg, attn::pattern>) {
    if (kind == attn::pass_kind::window_band) {
      band = true;
      band_len = seg.window;
    } else if (kind == attn::pass_kind::dilated && comp == 0) {
      band = true;
      band_lo = seg.window + 1;
      band_len = seg.dil[0].span - band_lo;
    }
  }
  T const* const qb = p.q + b * p.qs.batch + h * p.qs.head;
  T const* const kb = p.k + b * p.ks.batch + h * p.ks.head;
  T const* const vb = p.v + b * p.vs.batch + h * p.vs.head;
  auto const swz_q = cuda_swz<BM>;  // Q and K/V tiles in the 128-byte swizzled layout
  auto const swz = cuda_swz<BN>;

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
      row_live[x] = lr[x] < cnt;
      if constexpr (std::is_same_v<Seg, attn::pattern>)
        row_live[x] = row_live[x] && (kind == attn::pass_kind::global_rows || !seg.is_global(row_id[x]));
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

    // Query rows → shared memory (a fixed trip count; rows past the tile read its first row and
    // copy zeros).
    static_assert(BM * CH % NT == 0, "attention: every thread copies the same number of Q pieces");
#pragma unroll
    for (int i = 0; i < BM * CH / NT; ++i) {
      int const idx = tid + i * NT, r = idx / CH, c = idx % CH;
      std::int64_t const row = unsigned(rows[r < cnt ? r : 0]);
      cp_async_16(sq + swz_q(r, c), qb + row * p.qs.seq + c * 8, r < cnt ? 16 : 0);
    }
    cp_async_commit();
#if !DRDIFF_WGMMA
    bool q_ready = false;
#endif
    cuda_q_frags<D> qf;

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
      // exactness), so the copies and the mask only read them. K/V go through S stages: chunk c + S − 1
      // loads while chunk c computes, and the one barrier per chunk both publishes chunk c and frees the
      // stage of chunk c − 1 for reuse.
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
      auto load_chunk = [&](int stage, int c) {
        T* const dk = sk + stage * BN * D;
        T* const dv = sv + stage * BN * D;
        int const* const kx = kidx[c & 3];
        static_assert(BN * CH % NT == 0, "attention: every thread copies the same number of 16-byte pieces");
#pragma unroll
        for (int i = 0; i < BN * CH / NT; ++i) {  // a fixed trip count: unrolled without branches
          int const idx = tid + i * NT, r = idx / CH, ch = idx % CH, j = kx[r];
          std::int64_t const row = unsigned(max(j, 0));  // zero-extended; an empty slot reads key 0, copies zeros
          int const bytes = j >= 0 ? 16 : 0;
          cp_async_16(dk + swz(r, ch), kb + row * p.ks.seq + ch * 8, bytes);
          cp_async_16(dv + swz(r, ch), vb + row * p.vs.seq + ch * 8, bytes);
        }
      };
      for (int c = 0; c < S && c < total; ++c) fill_keys(c);
      __syncthreads();
#pragma unroll
      for (int c = 0; c + 1 < S; ++c) {
        if (c < total) load_chunk(c, c);
        cp_async_commit();
      }
      for (int c = 0, stage = 0; c < total; ++c, stage = stage == S - 1 ? 0 : stage + 1) {
        cp_async_wait<S - 2>();  // chunk c has landed (later ones may be in flight)
        fence_proxy_async();     // the tile is read by wgmma (async proxy) on sm_90a
        __syncthreads();         // every warp is past chunk c − 1: its stage and key slot are free
        if (c + S - 1 < total) load_chunk(stage == 0 ? S - 1 : stage - 1, c + S - 1);
        cp_async_commit();
        if (c + S < total) fill_keys(c + S);
#if !DRDIFF_WGMMA
        if (!q_ready) {
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk)
            ldmatrix_x4(qf.f[kk], sq + swz_q(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
          q_ready = true;
        }
#endif
        bool const exact = (kexact[c & 3] & exact_all) == exact_all;  // (bytes past BN / 32 are never written)
        int const* const keys = kidx[c & 3];
        T const* const ck = sk + stage * BN * D;
        T const* const cv = sv + stage * BN * D;

        auto mask = [&](float (&s)[BN / 8][4], float (&mx)[2]) {
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
            attn::pass_kind const ck_kind = c < tail_chunk ? kind : attn::pass_kind::global_keys;
#pragma unroll
            for (int nt = 0; nt < BN / 8; ++nt)
#pragma unroll
              for (int e = 0; e < 4; ++e) {
                int const x = e / 2, j = keys[nt * 8 + tig * 2 + (e & 1)];
                bool ok = j >= 0 && row_live[x];
                if constexpr (std::is_same_v<Seg, attn::pattern>) {
                  ok = ok && seg.owns_segment_key(ck_kind, comp, row_id[x], j);
                } else {
                  ok = ok && seg.owns(pass, row_id[x], j);
                }
                s[nt][e] = ok ? s[nt][e] * sc : -INFINITY;
                mx[x] = fmaxf(mx[x], s[nt][e]);
              }
          }
        };
        cuda_attention_chunk<T, D, BM, BN>(sq, ck, cv, qf, exact, p.scale_log2, mask, m, l, acc);
      }
      cp_async_wait<0>();
      __syncthreads();
      if (!more) break;
    }

    // Write back: the output (last pass) or the running state.
    cuda_cta_role const wb = cuda_role(p);
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      l[x] += __shfl_xor_sync(0xffffffffu, l[x], 1);
      l[x] += __shfl_xor_sync(0xffffffffu, l[x], 2);
    }
#pragma unroll
    for (int x = 0; x < 2; ++x) {
      if (lr[x] >= cnt) continue;
      int const row = rows[lr[x]];
      bool const out = wb.last && wb.split_keys == 0;
      std::int64_t const sr = out ? 0 : cuda_state_row(p, wb, b, h, row, t * BM + r0 + lr[x]);
      cuda_write_row<D>(p, b, h, row, out, wb.split_keys > 0, sr, m[x], l[x], acc, x);
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------------
// Band kernel: the window pass of a pattern (pass_kind::window_band) when it is the first pass of its
// rows and carries no global-key tail. A tile of 64 consecutive rows [r0, r0 + cnt) sees the
// consecutive keys [r0 − w, r0 + cnt − 1 + w] ∩ [0, L), so its chunks are found, copied and masked by
// arithmetic: no segment table, no key indices in shared memory, and the mask only where the band's
// edges or the keys' end cut through a chunk. The per-chunk work is the tensor-core kernel's.

template <class T, int D, int S>
__global__ void __launch_bounds__(128, cuda_attention_min_blocks(D, 4))
    attention_band_kernel(__grid_constant__ const cuda_attention_params<T, attn::pattern> p) {
  static_assert(S == 2 || S == 3, "attention: 2 or 3 K/V stages");
  constexpr int BM = 64, BN = cuda_attention_bn, CH = D / 8, NT = 128;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* const sq = cuda_tile_base<T>(smem_raw);
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
  attn::pattern const& pt = p.table[p.table_size == 1 ? 0 : h - p.head0];
  int const t = int(blockIdx.x) - p.pre_ctas;
  if (t >= pt.num_q_tiles(p.pass)) return;
  attn::index_range const rows = pt.q_tile(p.pass, t);  // consecutive rows, at most 64 (the tile)
  int const cnt = rows.count, r0 = rows.start;
  if (cnt <= 0) return;
  int const L = p.kv_lens ? p.kv_lens[b] : p.seq;
  // Rows run to seq even when keys stop at L, so only seq bounds the reach (and keeps the sums below
  // from overflowing).
  int const w = min(pt.window, p.seq);
  int const k_lo = max(0, r0 - w), k_hi = min(L, r0 + cnt + w);  // the tile's keys [k_lo, k_hi)
  int const total = k_hi > k_lo ? (k_hi - k_lo + BN - 1) / BN : 0;
  int const tid = int(threadIdx.x), warp = tid / 32, lane = tid % 32, g = lane / 4, tig = lane % 4;
  int const lr[2] = {warp * 16 + g, warp * 16 + g + 8};
  int row_id[2];
  bool row_live[2];  // a row of the tile that this pass owns keys for (not a global row)
#pragma unroll
  for (int x = 0; x < 2; ++x) {
    row_id[x] = r0 + lr[x];
    row_live[x] = lr[x] < cnt && !pt.is_global(row_id[x]);
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
  static_assert(BM * CH % NT == 0 && BN * CH % NT == 0, "attention: every thread copies the same number of pieces");
#pragma unroll
  for (int i = 0; i < BM * CH / NT; ++i) {  // rows past the tile read its first row and copy zeros
    int const idx = tid + i * NT, r = idx / CH, c = idx % CH;
    std::int64_t const row = r0 + (r < cnt ? r : 0);
    cp_async_16(sq + cuda_swz<BM>(r, c), qb + row * p.qs.seq + c * 8, r < cnt ? 16 : 0);
  }
  cp_async_commit();
  cuda_q_frags<D> qf;
#if !DRDIFF_WGMMA
  bool q_ready = false;
#endif
  // This thread's pieces: rows tid / CH + i·(NT / CH) of a chunk, 16-byte column tid % CH. The source
  // rows advance by BN keys per chunk (chunks load in order), so the copy adds a stride.
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
#pragma unroll
  for (int c = 0; c + 1 < S; ++c) {
    if (c < total) load_chunk(c, c);
    cp_async_commit();
  }
  for (int c = 0, stage = 0; c < total; ++c, stage = stage == S - 1 ? 0 : stage + 1) {
    cp_async_wait<S - 2>();
    fence_proxy_async();
    __syncthreads();  // chunk c has landed everywhere; every warp is past chunk c − 1
    if (c + S - 1 < total) load_chunk(stage == 0 ? S - 1 : stage - 1, c + S - 1);
    cp_async_commit();
#if !DRDIFF_WGMMA
    if (!q_ready) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk)
        ldmatrix_x4(qf.f[kk], sq + cuda_swz<BM>(warp * 16 + (lane & 15), kk * 2 + (lane >> 4)));
      q_ready = true;
    }
#endif
    int const j0 = k_lo + c * BN;
    bool const exact = all_live && j0 + BN <= k_hi && j0 >= r0 + cnt - 1 - w && j0 + BN - 1 <= r0 + w;
    auto mask = [&](float (&s)[BN / 8][4], float (&mx)[2]) {
      // Row x owns the chunk's columns lo .. hi (keys i − w .. min(i + w, k_hi − 1)); column
      // nt·8 + tig·2 + e % 2 is in when nt·8 + e % 2 − (lo − tig·2) ≤ hi − lo, unsigned.
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
    cuda_attention_chunk<T, D, BM, BN>(sq, sk + stage * BN * D, sv + stage * BN * D, qf, exact, p.scale_log2, mask, m,
                                       l, acc);
  }
  cp_async_wait<0>();

#pragma unroll
  for (int x = 0; x < 2; ++x) {
    l[x] += __shfl_xor_sync(0xffffffffu, l[x], 1);
    l[x] += __shfl_xor_sync(0xffffffffu, l[x], 2);
  }
#pragma unroll
  for (int x = 0; x < 2; ++x)
    if (lr[x] < cnt) {
      bool const out = p.last != 0;
      std::int64_t const sr = out ? 0 : cuda_state_row(p, cuda_cta_role{}, b, h, row_id[x], 0);
      cuda_write_row<D>(p, b, h, row_id[x], out, false, sr, m[x], l[x], acc, x);
    }
}

// ---------------------------------------------------------------------------------------------------
// SIMT kernel (fp32, any supported head_dim): one thread per query row, keys staged 16 at a time.

template <class T, class Seg>
__global__ void __launch_bounds__(64) attention_simt_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p) {
  constexpr int BM = 64, BN = 16, DMAX = 256;
  extern __shared__ __align__(16) unsigned char smem_raw[];
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
  int const L = p.kv_lens ? p.kv_lens[b] : p.seq;
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
    for (int skip = 0;; skip += cuda_segment_batch) {
      if (tid == 0) {
        n_segs = 0;
        seen = 0;
        seg.for_each_segment(pass, t, cuda_segment_collector{segs, &n_segs, &seen, skip, key_lo, key_hi});
      }
      __syncthreads();
      int const ns = n_segs;
      bool const more = seen > skip + cuda_segment_batch;
      for (int s = 0; s < ns; ++s) {
        cuda_segment const sg = segs[s];
        for (int off = 0; off < sg.keys.count; off += BN) {
          int const kc = min(BN, sg.keys.count - off);
          attn::index_range const kr = sg.keys.sub(off, kc);
          for (int idx = tid; idx < BN * D; idx += blockDim.x) {
            int const r = idx / D, d = idx % D;
            std::int64_t const j = r < kc ? kr[r] : 0;
            sk[idx] = r < kc ? float(kb[j * p.ks.seq + d]) : 0.f;
            sv[idx] = r < kc ? float(vb[j * p.vs.seq + d]) : 0.f;
            if (d == 0) key_idx[r] = int(j);
          }
          __syncthreads();
          if (active) {
            for (int r = 0; r < kc; ++r) {
              if (!sg.exact && !seg.owns(pass, row, key_idx[r])) continue;
              float dot = 0.f;
              for (int d = 0; d < D; ++d) dot += q[d] * sk[r * D + d];
              float const sc = dot * p.scale_log2;
              float const m_new = fmaxf(m, sc);
              float const alpha = exp2f(m - m_new), pr = exp2f(sc - m_new);
              l = l * alpha + pr;
              for (int d = 0; d < D; ++d) acc[d] = acc[d] * alpha + pr * sv[r * D + d];
              m = m_new;
            }
          }
          __syncthreads();
        }
      }
      if (!more) break;
    }
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

/// Most key splits of a global-row pass (the merge weighs them in one warp, two per lane).
inline constexpr int cuda_max_splits = 64;

template <class T, class Seg>
__global__ void attention_merge_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p, int splits) {
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
    o[d] = T(a * inv);
  }
}

}  // namespace detail
DRDIFF_NAMESPACE_END
