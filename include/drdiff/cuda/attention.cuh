#pragma once
/// \file
/// CUDA backend of drdiff::attention: element types __nv_bfloat16 and __half (tensor cores,
/// head_dim 64 or 128) and float (SIMT, every supported head_dim; meant for testing).
///
/// The policy is bound on the host for each head (per-head dilation rates are host memory; a
/// global-token list must be device memory). Passes run as launches on ctx.stream in an order that
/// keeps the running state of a row in one place: first the passes over ordinary rows (window,
/// dilations, global keys; the state lives in the workspace between them, in fp32; the tensor-core
/// kernel runs the global-key pass as the tail of the last other one, in the same launch), then the
/// global rows, split across key ranges and merged by log-sum-exp (the tensor-core kernel runs the
/// splits in the launch of the first ordinary pass on the general kernel, whose short tiles fill in
/// around them; the merge follows the last pass). A pattern of one pass (dense, a window alone) needs
/// no state at all. A window pass that starts its rows and has no global-key tail runs on the band
/// kernel, which finds its keys by arithmetic. The other ordinary passes read the key segments of
/// their query tiles from tables in the workspace, resolved before they run (the policy's visitor,
/// one thread per tile) by one small launch, or by the first CTAs of the band kernel's launch when it
/// runs first; called without a workspace, a one-pass pattern collects them in each CTA instead.
/// Nothing is allocated: the workspace is the caller's.

#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/kernels/attention.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

template <class T>
inline constexpr bool is_cuda_attention_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

/// Keys per split of a global-row pass: at least 2048 (more, shorter splits measured no faster on H100:
/// the merge grows as the pass shrinks), and at most cuda_max_splits (64) splits.
inline int cuda_split_keys(int n) { return std::max(2048, (n + cuda_max_splits - 1) / cuda_max_splits); }

template <class T>
struct attention_impl<cuda, T, std::enable_if_t<is_cuda_attention_type_v<T>>> {
  static constexpr bool tensor_cores = !std::is_same_v<T, float>;
  /// Query rows per tile: 16 per warp of the tensor-core kernel, 64 for the SIMT kernel.
  static constexpr int rows_for(int warps) { return tensor_cores ? 16 * warps : 64; }

  template <class Policy>
  using seg_t = decltype(attn::segments_of(std::declval<attn::bound_t<Policy> const&>(), 0));

  /// What a call will launch: the bound policy per head and the order and kind of its passes.
  template <class Policy>
  struct plan {
    std::vector<seg_t<Policy>> heads;
    int warps = 4, tile_rows = 64;    // the tensor-core kernel's warps and the tile height
    bool shared = true;               // every head binds to the same policy
    std::vector<int> plain, split;    // passes over ordinary rows, key-split passes (global rows)
    bool tail_global = false;         // the last plain pass also runs the global-key pass (not launched)
    bool band_first = false;          // the first plain pass runs on the band kernel (no segment table)
    int split_keys = 0, splits = 0, part_rows = 0;
    std::size_t state_floats = 0, part_floats = 0;
    std::size_t seg_entries = 0;  // tiles × table entries of every plain pass (the segment tables)

    std::size_t seg_table_offset() const { return ((state_floats + part_floats) * sizeof(float) + 255) / 256 * 256; }
    std::size_t bytes() const {
      return seg_table_offset() + seg_entries * (cuda_segment_batch * sizeof(cuda_segment) + sizeof(int)) + 256;
    }
  };

  /// Warps of the tensor-core kernel for the bound heads: 8 (128-row tiles, half the K/V traffic per
  /// row) when every head's pattern is dense, else 4 (64-row tiles, four CTAs per SM), measured
  /// faster for every sparse pattern on the H100 (docs/benchmarks.md). DRDIFF_CUDA_ATTENTION_WARPS
  /// forces one.
  template <class Seg>
  static int choose_warps(std::vector<Seg> const& heads) {
#ifdef DRDIFF_CUDA_ATTENTION_WARPS
    (void)heads;
    return DRDIFF_CUDA_ATTENTION_WARPS;
#else
    if constexpr (std::is_same_v<Seg, attn::pattern>) {
      for (auto const& pt : heads)
        for (int p = 0; p < pt.num_passes(); ++p)
          if (pt.kind(p) != attn::pass_kind::dense_rows) return 4;
      return 8;
    } else {
      (void)heads;
      return 4;
    }
#endif
  }

  template <class Policy>
  static plan<Policy> make_plan(Policy const& policy, attention_args<T> const& a) {
    plan<Policy> pl;
    for (int h = 0; h < a.heads; ++h) pl.heads.push_back(attn::segments_of(attn::bind(policy, a.seq, h), a.seq));
    // The tile height follows from the bound heads; patterns take it as their segment tile.
    pl.warps = choose_warps(pl.heads);
    pl.tile_rows = rows_for(pl.warps);
    int const tile_rows = pl.tile_rows;
    if constexpr (std::is_same_v<seg_t<Policy>, attn::pattern>)
      for (auto& pt : pl.heads) pt.tile = tile_rows;
    for (int h = 1; h < a.heads; ++h)
      if (std::memcmp(&pl.heads[h], &pl.heads[0], sizeof(pl.heads[0])) != 0) pl.shared = false;
    int const passes = pl.heads[0].num_passes();
    for (auto const& s : pl.heads)
      DRDIFF_CHECK(s.num_passes() == passes, "attention (cuda): heads bind to patterns with different pass counts ",
                   passes, " and ", s.num_passes(), " (per-head parameters must keep the pattern's components)");
    for (int p = 0; p < passes; ++p) {
      bool is_split = false;
      if constexpr (std::is_same_v<seg_t<Policy>, attn::pattern>)
        is_split = pl.heads[0].kind(p) == attn::pass_kind::global_rows;
      (is_split ? pl.split : pl.plain).push_back(p);
    }
    // The tensor-core kernel runs the global-key pass inside the last other ordinary pass (its keys
    // form a tail of that pass's stream): one launch and one round trip of the running state fewer.
    if constexpr (tensor_cores && std::is_same_v<seg_t<Policy>, attn::pattern>) {
      if (pl.plain.size() >= 2 && pl.heads[0].kind(pl.plain.back()) == attn::pass_kind::global_keys) {
        pl.tail_global = true;
        pl.plain.pop_back();
      }
    }
    // A window pass that starts its rows' state and carries no global-key tail runs on the band kernel.
    if constexpr (tensor_cores && std::is_same_v<seg_t<Policy>, attn::pattern>) {
#ifndef DRDIFF_CUDA_ATTENTION_NO_BAND
      pl.band_first = pl.warps == 4 && !pl.plain.empty() && !(pl.tail_global && pl.plain.size() == 1);
      for (auto const& pt : pl.heads)
        pl.band_first = pl.band_first && pt.kind(pl.plain.front()) == attn::pass_kind::window_band;
#endif
    }
    std::size_t const rows = std::size_t(a.batch) * a.heads * a.seq;
    if (pl.plain.size() > 1) pl.state_floats = rows * (2 + std::size_t(a.head_dim));
    if (!pl.split.empty()) {
      pl.split_keys = cuda_split_keys(a.seq);
      pl.splits = (a.seq + pl.split_keys - 1) / pl.split_keys;
      DRDIFF_CHECK(pl.splits <= cuda_max_splits, "attention (cuda): ", pl.splits, " key splits (internal limit ",
                   cuda_max_splits, ")");
      for (int p : pl.split)
        for (auto const& s : pl.heads) pl.part_rows = std::max(pl.part_rows, s.num_q_tiles(p) * tile_rows);
      pl.part_floats = std::size_t(pl.splits) * a.batch * a.heads * pl.part_rows * (2 + std::size_t(a.head_dim));
    }
    if constexpr (tensor_cores) {  // one table per ordinary pass, resolved before the first pass
      std::size_t const entries = pl.shared ? 1 : std::size_t(std::min(a.heads, cuda_table_heads));
      for (std::size_t i = pl.band_first ? 1 : 0; i < pl.plain.size(); ++i) {
        int tiles = 0;
        for (auto const& s : pl.heads) tiles = std::max(tiles, s.num_q_tiles(pl.plain[i]));
        pl.seg_entries += std::size_t(tiles) * entries;
      }
    }
    return pl;
  }

  static void check(attention_args<T> const& a) {
    DRDIFF_CHECK(a.seq <= cuda_attention_max_seq, "attention (cuda): seq = ", a.seq, " is above the ",
                 cuda_attention_max_seq, " tokens the kernels index");
    validate(a, /*host_lens=*/false);
    if constexpr (tensor_cores) {
      DRDIFF_CHECK(a.head_dim == 64 || a.head_dim == 128, "attention (cuda): head_dim = ", a.head_dim,
                   " is not supported for 16-bit types (64, 128)");
      auto aligned = [](void const* ptr, tensor_strides const& s) {
        return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0 && s.batch % 8 == 0 && s.seq % 8 == 0 &&
               s.head % 8 == 0;
      };
      DRDIFF_CHECK(aligned(a.q, a.q_strides), "attention (cuda): q must be 16-byte aligned with strides that are "
                   "multiples of 8 elements");
      DRDIFF_CHECK(aligned(a.k, a.k_strides), "attention (cuda): k must be 16-byte aligned with strides that are "
                   "multiples of 8 elements");
      DRDIFF_CHECK(aligned(a.v, a.v_strides), "attention (cuda): v must be 16-byte aligned with strides that are "
                   "multiples of 8 elements");
      DRDIFF_CHECK(reinterpret_cast<std::uintptr_t>(a.o) % 4 == 0 && a.o_strides.seq % 2 == 0 &&
                       a.o_strides.head % 2 == 0 && a.o_strides.batch % 2 == 0,
                   "attention (cuda): o must be 4-byte aligned with even strides");
    }
  }

  template <class Policy>
  static std::size_t workspace_bytes(context<cuda> const&, Policy const& policy, attention_args<T> const& a) {
    check(a);
    attn::validate(policy, a.seq, a.heads, /*read_pointers=*/false);
    return make_plan(policy, a).bytes();
  }

  /// K/V stages and alignment slack of the tensor-core kernel on the current device: the most stages
  /// (3, else 2) with which the CTAs per SM the kernel is compiled for still fit the SM's shared
  /// memory, else the most that fit one block; the 1024-byte slack only on compute capability 9.0
  /// (the wgmma path's 128-byte-swizzled tiles need 1024-byte alignment).
  struct kernel_shape {
    int stages = cuda_attention_max_stages;
    int slack = 0;
  };
  static constexpr int smem_bytes(int d, int warps, int stages, int slack) {
    return (rows_for(warps) + 2 * stages * cuda_attention_bn) * d * int(sizeof(T)) + slack;
  }
  template <int D, int W, class Seg>
  static kernel_shape shape_for_device() {
    int dev = 0, optin = 0, per_sm = 0, reserved = 0, major = 0, minor = 0;
    DRDIFF_CUDA_CHECK(cudaGetDevice(&dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    cudaFuncAttributes fa{};
    DRDIFF_CUDA_CHECK(cudaFuncGetAttributes(&fa, attention_mma_kernel<T, D, cuda_attention_max_stages, W, Seg>));
    kernel_shape k;
    k.slack = major == 9 && minor == 0 ? 1024 : 0;
    int const fixed = int(fa.sharedSizeBytes);  // static shared memory, the same for every stage count
    int const blocks = cuda_attention_min_blocks(D, W);
    for (k.stages = cuda_attention_max_stages; k.stages >= 2; --k.stages) {
      int const bytes = smem_bytes(D, W, k.stages, k.slack) + fixed;
      if (bytes <= optin && blocks * (bytes + reserved) <= per_sm) return k;  // the system reserves some per block
    }
    for (k.stages = cuda_attention_max_stages; k.stages >= 2; --k.stages)
      if (smem_bytes(D, W, k.stages, k.slack) + fixed <= optin) return k;
    DRDIFF_CHECK(false, "attention (cuda): head_dim = ", D, " needs ", smem_bytes(D, W, 2, k.slack) + fixed,
                 " bytes of shared memory per block; this device allows ", optin);
    return k;
  }

  template <int D, int W, class Seg>
  static void launch(cuda_attention_params<T, Seg> const& prm, dim3 grid, cudaStream_t stream, kernel_shape k,
                     bool band) {
    if constexpr (tensor_cores) {
      int const smem = smem_bytes(D, W, k.stages, k.slack);
      if constexpr (W == 4 && std::is_same_v<Seg, attn::pattern>) {
        if (band) {
          auto const kernel = k.stages == 3 ? attention_band_kernel<T, D, 3> : attention_band_kernel<T, D, 2>;
          DRDIFF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
          kernel<<<grid, 128, smem, stream>>>(prm);
          DRDIFF_CUDA_CHECK(cudaGetLastError());
          return;
        }
      }
      auto const kernel =
          k.stages == 3 ? attention_mma_kernel<T, D, 3, W, Seg> : attention_mma_kernel<T, D, 2, W, Seg>;
      // Per call: the attribute belongs to the current device, and setting it costs microseconds.
      DRDIFF_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
      kernel<<<grid, 32 * W, smem, stream>>>(prm);
    } else {
      attention_simt_kernel<T, Seg><<<grid, 64, 2 * 16 * prm.dim * sizeof(float), stream>>>(prm);
    }
    (void)band;
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }

  /// Whether the kernel of W warps is compiled for segment type Seg: 4 always, 8 for patterns (the
  /// only ones that pick it); a forced DRDIFF_CUDA_ATTENTION_WARPS compiles that one alone.
  template <int W, class Seg>
  static constexpr bool has_warps() {
#ifdef DRDIFF_CUDA_ATTENTION_WARPS
    return W == DRDIFF_CUDA_ATTENTION_WARPS;
#else
    return W == 4 || std::is_same_v<Seg, attn::pattern>;
#endif
  }
  /// Calls f(std::integral_constant<int, W>) for the compiled W equal to `warps`.
  template <class Seg, class F>
  static void with_warps(int warps, F&& f) {
    if constexpr (has_warps<8, Seg>())
      if (warps == 8) return f(std::integral_constant<int, 8>{});
    if constexpr (has_warps<4, Seg>())
      if (warps == 4) return f(std::integral_constant<int, 4>{});
    DRDIFF_CHECK(false, "attention (cuda): no kernel of ", warps, " warps is compiled for this policy");
  }

  template <class Seg>
  static kernel_shape shape_dim(int dim, int warps) {
    kernel_shape k{};
    if constexpr (tensor_cores)
      with_warps<Seg>(warps, [&](auto w) {
        k = dim == 64 ? shape_for_device<64, decltype(w)::value, Seg>() : shape_for_device<128, decltype(w)::value, Seg>();
      });
    return k;
  }

  template <class Seg>
  static void launch_dim(cuda_attention_params<T, Seg> const& prm, int warps, dim3 grid, cudaStream_t stream,
                         kernel_shape k, bool band = false) {
    if constexpr (tensor_cores) {
      with_warps<Seg>(warps, [&](auto w) {
        if (prm.dim == 64) launch<64, decltype(w)::value>(prm, grid, stream, k, band);
        else launch<128, decltype(w)::value>(prm, grid, stream, k, band);
      });
    } else {
      launch<0, 4>(prm, grid, stream, k, band);
    }
  }

  template <class Policy>
  static void run(context<cuda> const& ctx, Policy const& policy, attention_args<T> const& a, void* workspace,
                  std::size_t workspace_size) {
    check(a);
    attn::validate(policy, a.seq, a.heads, /*read_pointers=*/false);
    auto const pl = make_plan(policy, a);
    std::size_t const need = pl.bytes();
    DRDIFF_CHECK(workspace != nullptr || pl.state_floats + pl.part_floats == 0,
                 "attention (cuda): this policy needs ", need, " bytes of workspace; pass a device buffer of "
                 "attention_workspace_bytes() bytes");
    DRDIFF_CHECK(workspace == nullptr || workspace_size >= need, "attention (cuda): workspace_bytes = ",
                 workspace_size, " is smaller than the ", need, " bytes attention_workspace_bytes() asks for");
    if (ctx.device >= 0) DRDIFF_CUDA_CHECK(cudaSetDevice(ctx.device));
    auto const stream = reinterpret_cast<cudaStream_t>(ctx.stream);

    using Seg = seg_t<Policy>;
    kernel_shape const shape = shape_dim<Seg>(a.head_dim, pl.warps);
    int const tile_rows = pl.tile_rows;
    cuda_attention_params<T, Seg> prm{};
    prm.batch = a.batch; prm.seq = a.seq; prm.heads = a.heads; prm.dim = a.head_dim;
    prm.q = a.q; prm.k = a.k; prm.v = a.v; prm.o = a.o;
    prm.qs = a.q_strides; prm.ks = a.k_strides; prm.vs = a.v_strides; prm.os = a.o_strides;
    prm.lse = a.maybe_lse;
    prm.kv_lens = a.maybe_kv_lens;
    prm.scale_log2 = float(a.scale() * 1.4426950408889634);
    prm.tile_rows = tile_rows;
    auto const base = (reinterpret_cast<std::uintptr_t>(workspace) + 255) / 256 * 256;
    float* const ws = reinterpret_cast<float*>(base);
    std::size_t const rows = std::size_t(a.batch) * a.heads * a.seq;
    if (pl.state_floats) {
      prm.st_m = ws;
      prm.st_l = ws + rows;
      prm.st_acc = ws + 2 * rows;
    }
    if (pl.part_floats) {
      std::size_t const pr = std::size_t(pl.splits) * a.batch * a.heads * pl.part_rows;
      prm.part_m = ws + pl.state_floats;
      prm.part_l = prm.part_m + pr;
      prm.part_acc = prm.part_l + pr;
      prm.part_rows = pl.part_rows;
    }

    auto* const seg_table = reinterpret_cast<cuda_segment*>(reinterpret_cast<unsigned char*>(base) +
                                                            pl.seg_table_offset());
    int* const seg_count = reinterpret_cast<int*>(seg_table + pl.seg_entries * cuda_segment_batch);

    // Heads in groups that fit the launch's table (one group when every head shares the policy).
    int const group = pl.shared ? a.heads : cuda_table_heads;
    for (int h0 = 0; h0 < a.heads; h0 += group) {
      int const hn = std::min(group, a.heads - h0);
      prm.head0 = h0;
      prm.heads_in_launch = hn;
      prm.table_size = pl.shared ? 1 : hn;
      for (int i = 0; i < prm.table_size; ++i) prm.table[i] = pl.heads[h0 + i];
      auto tiles = [&](int p) {
        int m = 0;
        for (int i = 0; i < hn; ++i) m = std::max(m, pl.heads[h0 + i].num_q_tiles(p));
        return m;
      };
      // Every ordinary pass's tile segments, resolved before the first pass by one launch per
      // cuda_segment_passes::max passes (one launch for every pattern; a one-pass pattern called
      // without a workspace collects them in each CTA instead).
      bool const tables = pl.seg_entries > 0 && workspace != nullptr;
      if (tables) {
        std::int64_t next = 0;  // first table entry of the next pass
        cuda_segment_passes ps;
        int most = 0;
        auto flush = [&](bool last) {
          if (ps.n == 0) return;
          if (last && pl.band_first && tiles(pl.plain.front()) > 0) {  // the band launch runs it, first
            prm.pre = ps;
            prm.pre_table = seg_table;
            prm.pre_count = seg_count;
            prm.pre_blocks = (most + 127) / 128;
            prm.pre_ctas = prm.pre_blocks * ps.n;
          } else {
            attention_segments_kernel<T, Seg><<<dim3(unsigned((most + 127) / 128), unsigned(prm.table_size),
                                                     unsigned(ps.n)), 128, 0, stream>>>(prm, ps, seg_table, seg_count);
            DRDIFF_CUDA_CHECK(cudaGetLastError());
          }
          ps = cuda_segment_passes{};
          most = 0;
        };
        for (std::size_t i = pl.band_first ? 1 : 0; i < pl.plain.size(); ++i) {
          int const p = pl.plain[i], nt = tiles(p);
          if (nt == 0) continue;
          ps.pass[ps.n] = p;
          ps.tail[ps.n] = pl.tail_global && i + 1 == pl.plain.size() ? 1 : 0;
          ps.tiles[ps.n] = nt;
          ps.offset[ps.n] = next;
          ps.n++;
          next += std::int64_t(nt) * prm.table_size;
          most = std::max(most, nt);
          if (ps.n == cuda_segment_passes::max) flush(false);
        }
        flush(true);
      }
      // The key splits of the global-row pass run in the launch of the first ordinary pass on the
      // general kernel (its CTAs first), when there is one; the merge follows the last ordinary pass
      // either way.
      int const co_pass = tensor_cores && !pl.split.empty() ? pl.split.front() : -1;
      bool co_done = false;
      std::int64_t seg_at = 0;  // the pass's first table entry: the pre-pass laid the tables out in this order
      for (std::size_t i = 0; i < pl.plain.size(); ++i) {
        int const p = pl.plain[i];
        prm.pass = p;
        prm.first = i == 0;
        prm.last = i + 1 == pl.plain.size();
        prm.tail_global = pl.tail_global && prm.last ? 1 : 0;
        prm.split_keys = 0;
        int const nt = tiles(p);
        if (nt == 0) continue;
        bool const band = i == 0 && pl.band_first;  // (no table; the splits ride with a later pass)
        prm.seg_table = tables && !band ? seg_table + seg_at * cuda_segment_batch : nullptr;
        prm.seg_count = tables && !band ? seg_count + seg_at : nullptr;
        prm.seg_tiles = nt;
        if (!band) seg_at += std::int64_t(nt) * prm.table_size;
        prm.co_ctas = 0;
        if (co_pass >= 0 && !co_done && !band && tiles(co_pass) > 0) {
          prm.co_pass = co_pass;
          prm.co_tiles = tiles(co_pass);
          prm.co_split_keys = pl.split_keys;
          prm.co_ctas = prm.co_tiles * pl.splits;
          co_done = true;
        }
        launch_dim(prm, pl.warps, dim3(unsigned(prm.co_ctas + prm.pre_ctas + nt), unsigned(a.batch * hn), 1), stream,
                   shape, band);
        prm.co_ctas = 0;
        prm.pre_ctas = 0;
        prm.seg_table = nullptr;
        prm.seg_count = nullptr;
      }
      for (int p : pl.split) {
        prm.pass = p;
        prm.first = prm.last = 1;
        prm.tail_global = 0;
        prm.split_keys = pl.split_keys;
        int const nt = tiles(p);
        if (nt == 0) continue;
        if (!(co_done && p == co_pass))
          launch_dim(prm, pl.warps, dim3(unsigned(nt), unsigned(a.batch * hn), unsigned(pl.splits)), stream, shape);
        attention_merge_kernel<T, Seg><<<dim3(unsigned(nt * tile_rows), unsigned(a.batch * hn)), 128, 0, stream>>>(
            prm, pl.splits);
        DRDIFF_CUDA_CHECK(cudaGetLastError());
      }
    }
#ifdef DRDIFF_DEBUG_SYNC
    DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
