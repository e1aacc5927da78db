#pragma once
/// \file
/// The launch parameters of the CUDA attention kernels and the key segments of their query tiles:
/// cuda_attention_params (built once per launch by the host, cuda/attention.cuh), what a CTA runs
/// (cuda_role), the collection of a tile's key segments into one stream of keys, and the segment
/// pre-pass kernel (attention_segments_kernel) that resolves them for every tile before the attention
/// launches read them.

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/index_range.hpp>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/cuda/tuning.cuh>

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Bound policies passed to one launch: one shared by every head, or one per head.
inline constexpr int cuda_table_heads = 16;
/// Sequence lengths the kernels index (distances stay clear of the empty-slot sentinel below).
inline constexpr int cuda_attention_max_seq = (1 << 29) - 1;
/// Most key splits of a global-row pass (the merge weighs them in one warp, two per lane).
inline constexpr int cuda_max_splits = 64;

/// A tile's key segment. `exact`: every pair (row of the tile, key) is owned by the pass. `tail`: the
/// segment of the key-tail pass appended to a tile of the pass before it (cuda_attention_params::
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
  /// 1: this pass also runs the key-tail pass pass + 1 for its rows (attn::pass_traits::key_tail, the
  /// global keys of a pattern): each tile's stream ends with that pass's segment, so it needs no launch
  /// and no state round trip.
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

/// Calls `f` on the key segments of tile t of pass `pass`, then, with `tail`, on the segment of the
/// key-tail pass pass + 1 for the same rows (marked as the tail).
template <class Seg>
__device__ inline void cuda_visit_segments(Seg const& seg, int pass, int t, bool tail, cuda_segment_collector f) {
  seg.for_each_segment(pass, t, f);
  if constexpr (attn::has_tail_segment_v<Seg>) {  // (a capability; the plan asks for a tail only then)
    if (tail) {
      attn::index_range const rows = seg.q_tile(pass, t);
      f.tail = 1;
      if (!rows.empty()) seg.tail_segment(pass + 1, rows, f);
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
DRDIFF_KERNEL void attention_segments_kernel(__grid_constant__ const cuda_attention_params<T, Seg> p,
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


/// A finished row's 1/ℓ and log-sum-exp: 0 and −∞ for a row with no allowed key (ℓ = 0); NaN and NaN
/// when a NaN reached the row. (fmaxf drops a NaN score from the running max, but its exp2 makes ℓ
/// NaN, so ℓ carries it; without the last case the row's lse would read −∞, a row with no key.)
__device__ __forceinline__ float cuda_row_inverse(float l) { return l > 0.f ? 1.f / l : l == 0.f ? 0.f : l; }
__device__ __forceinline__ float cuda_row_lse(float m, float l) {
  return l > 0.f ? (m + log2f(l)) * 0.69314718055994531f : l == 0.f ? -INFINITY : l;
}

}  // namespace detail
DRDIFF_NAMESPACE_END
