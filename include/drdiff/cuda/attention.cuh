#pragma once
/// \file
/// CUDA backend of drdiff::attention, the host side: element types __nv_bfloat16 and __half (tensor
/// cores, head_dim 64 or 128) and float (SIMT, every supported head_dim; meant for testing). The
/// kernels are in cuda/kernels/attention*.cuh, the tuning in cuda/tuning.cuh.
///
/// A call is planned once (make_plan, CUTLASS's arguments → params): the policy bound per head (per-
/// head dilation rates are host memory; a global-token list must be device memory), the order and
/// kind of its passes, the workspace layout; then every launch gets its own parameters, built from
/// the plan and never changed. Passes run as launches on ctx.stream in an order that keeps the running
/// state of a row in one place: first the passes over ordinary rows (the state lives in the workspace
/// between them, in fp32), then the key-split passes (global rows), split across key ranges and
/// merged by log-sum-exp (the tensor-core kernel runs the splits in the launch of the first ordinary
/// pass on the general kernel, whose short tiles fill in around them; the merge follows the last
/// pass). A pattern of one pass (dense, a window alone) needs no state at all.
///
/// What a pass may run on is asked of the policy's capabilities (attention/capabilities.hpp), never
/// of its type: a key-tail pass (a pattern's global keys) rides as the tail of the pass before it, in
/// the same launch; a pass with one run of keys per tile (a window) that starts its rows runs on the
/// band kernel, which finds its keys by arithmetic; 8-warp tiles are taken when every pass is dense
/// and the policy lets the backend choose its tile height. The other ordinary passes read the key
/// segments of their query tiles from tables in the workspace, resolved before they run (the
/// policy's visitor, one thread per tile) by one small launch, or by the first CTAs of the band
/// kernel's launch when it runs first; called without a workspace, a one-pass pattern collects them
/// in each CTA instead. Nothing is allocated: the workspace is the caller's.

#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/kernels/attention.cuh>
#include <drdiff/cuda/kernels/attention_segments.cuh>
#include <drdiff/cuda/kernels/attention_simt.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/cuda/tuning.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

/// How drdiff::attention runs on the GPU for given arguments: what the plan chose (describe_attention).
struct attention_launch_info {
  int warps = 0;              ///< warps of the tensor-core kernel (0: the SIMT kernel)
  int tile_rows = 0;          ///< query rows per tile
  bool shared_pattern = true; ///< every head runs one bound pattern (one table entry per launch)
  bool band_kernel = false;   ///< the first ordinary pass runs on the band kernel (one run of keys per tile)
  bool key_tail = false;      ///< a key-tail pass rides as the tail of the pass before it
  int key_splits = 0;         ///< key splits of the key-split passes (0: none)
  int ordinary_passes = 0;    ///< passes launched over ordinary rows
};

namespace detail {

template <class T>
inline constexpr bool is_cuda_attention_type_v =
    std::is_same_v<T, float> || std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>;

template <class T>
struct attention_impl<cuda, T, std::enable_if_t<is_cuda_attention_type_v<T>>> {
  static constexpr bool tensor_cores = !std::is_same_v<T, float>;
  /// Query rows per tile: 16 per warp of the tensor-core kernel, 64 for the SIMT kernel.
  static constexpr int rows_for(int warps) { return tensor_cores ? 16 * warps : 64; }

  template <class Policy>
  using seg_t = decltype(attn::segments_of(std::declval<attn::bound_t<Policy> const&>(), 0));

  /// What a call will launch, computed once per call: the bound policy per head and the order and
  /// kind of its passes.
  template <class Policy>
  struct plan {
    std::vector<seg_t<Policy>> heads;
    int warps = 4, tile_rows = 64;    // the tensor-core kernel's warps and the tile height
    bool shared = true;               // every head binds to the same policy
    std::vector<int> plain, split;    // passes over ordinary rows, key-split passes (global rows)
    bool tail_global = false;         // the last plain pass also runs the key-tail pass (not launched)
    bool band_first = false;          // the first plain pass runs on the band kernel (no segment table)
    int split_keys = 0, splits = 0, part_rows = 0;
    std::size_t rows = 0;             // batch · heads · seq
    std::size_t state_rows = 0, part_count = 0;  // rows of the pass state and of the split partials
    std::size_t seg_entries = 0;  // tiles × table entries of every plain pass (the segment tables)
  };

  /// The workspace of a plan: the running state between passes, the split partials and the segment
  /// tables. One description for the size query and for the pointers (workspace_carver).
  struct workspace_layout {
    float *st_m, *st_l, *st_acc, *part_m, *part_l, *part_acc;
    cuda_segment* seg_table;
    int* seg_count;
  };
  template <class Policy>
  static workspace_layout carve(workspace_carver& w, plan<Policy> const& pl, int dim) {
    workspace_layout l{};
    l.st_m = w.take<float>(pl.state_rows);
    l.st_l = w.take<float>(pl.state_rows);
    l.st_acc = w.take<float>(pl.state_rows * std::size_t(dim));
    l.part_m = w.take<float>(pl.part_count);
    l.part_l = w.take<float>(pl.part_count);
    l.part_acc = w.take<float>(pl.part_count * std::size_t(dim));
    l.seg_table = w.take<cuda_segment>(pl.seg_entries * cuda_segment_batch);
    l.seg_count = w.take<int>(pl.seg_entries);
    return l;
  }

  /// Warps of the tensor-core kernel for the bound heads (cuda/tuning.cuh): the dense tuning when
  /// every pass of every head is dense and the policy lets the backend choose its tile height, else
  /// the sparse one.
  template <class Policy>
  static int choose_warps(std::vector<seg_t<Policy>> const& heads, cuda_attention_tuning const& tune) {
    using bound = attn::bound_t<Policy>;
    if constexpr (attn::detail::has_tiles<bound>::value && attn::has_capabilities_v<seg_t<Policy>>) {
      for (auto const& s : heads)
        for (int p = 0; p < s.num_passes(); ++p)
          if (!attn::traits_of(s, p).dense) return tune.sparse_warps;
      return tune.dense_warps;
    } else {
      (void)heads;
      return tune.sparse_warps;
    }
  }

  /// The plan of a call on a device of compute capability `arch` (detail::device_arch()).
  template <class Policy>
  static plan<Policy> make_plan(Policy const& policy, attention_args<T> const& a, int arch) {
    using Seg = seg_t<Policy>;
    cuda_attention_tuning const tune = cuda_attention_tuning_for(arch);
    plan<Policy> pl;
    std::vector<attn::bound_t<Policy>> bound;
    bound.reserve(std::size_t(a.heads));
    for (int h = 0; h < a.heads; ++h) bound.push_back(attn::bind(policy, a.seq, h));
    // The tile height follows from the bound heads' passes (traits do not depend on it); patterns
    // then take it as their query-tile height.
    for (auto const& b : bound) pl.heads.push_back(attn::segments_of(b, a.seq));
    pl.warps = choose_warps<Policy>(pl.heads, tune);
    pl.tile_rows = rows_for(pl.warps);
    int const tile_rows = pl.tile_rows;
    pl.heads.clear();
    for (auto const& b : bound) pl.heads.push_back(attn::segments_of(b, a.seq, tile_rows));
    for (int h = 1; h < a.heads; ++h)
      if (!attn::head_independent_v<Policy> && !attn::same_pattern(pl.heads[h], pl.heads[0])) pl.shared = false;
    int const passes = pl.heads[0].num_passes();
    for (auto const& s : pl.heads)
      DRDIFF_CHECK(s.num_passes() == passes, "attention (cuda): heads bind to patterns with different pass counts ",
                   passes, " and ", s.num_passes(), " (per-head parameters must keep the pattern's components)");
    // What each pass offers; a capability counts when every head's pass offers it.
    auto every_head = [&](int p, auto flag) {
      for (auto const& s : pl.heads)
        if (!flag(attn::traits_of(s, p))) return false;
      return true;
    };
    // The kernels index a tile's rows by the backend's tile height: a pass whose tiles are taller (a
    // user policy may choose its own tiles) takes neither the key split nor the band kernel.
    auto tiles_fit = [&](int p) {
      for (std::size_t h = 0; h < (pl.shared ? 1 : pl.heads.size()); ++h)
        for (int t = 0, n = pl.heads[h].num_q_tiles(p); t < n; ++t)
          if (pl.heads[h].q_tile(p, t).count > tile_rows) return false;
      return true;
    };
    for (int p = 0; p < passes; ++p) {
      bool const is_split = every_head(p, [](attn::pass_traits const& t) { return t.key_split; }) && tiles_fit(p);
      (is_split ? pl.split : pl.plain).push_back(p);
    }
    // The tensor-core kernel runs a key-tail pass inside the pass before it (its keys form a tail of
    // that pass's stream): one launch and one round trip of the running state fewer.
    if constexpr (tensor_cores && attn::has_tail_segment_v<Seg>) {
      std::size_t const n = pl.plain.size();
      if (n >= 2 && pl.plain[n - 2] == pl.plain[n - 1] - 1 &&
          every_head(pl.plain.back(), [](attn::pass_traits const& t) { return t.key_tail; })) {
        pl.tail_global = true;
        pl.plain.pop_back();
      }
    }
    // A pass with one run of keys per tile that starts its rows' state and carries no key tail runs
    // on the band kernel.
    if constexpr (tensor_cores && attn::has_capabilities_v<Seg>) {
      pl.band_first = tune.band_kernel && pl.warps == 4 && !pl.plain.empty() &&
                      !(pl.tail_global && pl.plain.size() == 1) &&
                      every_head(pl.plain.front(),
                                 [](attn::pass_traits const& t) { return t.one_run && t.band_lo == 0; }) &&
                      tiles_fit(pl.plain.front());
    }
    pl.rows = std::size_t(a.batch) * a.heads * a.seq;
    if (pl.plain.size() > 1) pl.state_rows = pl.rows;
    if (!pl.split.empty()) {
      pl.split_keys = std::max(tune.split_min_keys, (a.seq + cuda_max_splits - 1) / cuda_max_splits);
      pl.splits = (a.seq + pl.split_keys - 1) / pl.split_keys;
      DRDIFF_CHECK(pl.splits <= cuda_max_splits, "attention (cuda): ", pl.splits, " key splits (internal limit ",
                   cuda_max_splits, ")");
      for (int p : pl.split)
        for (auto const& s : pl.heads) pl.part_rows = std::max(pl.part_rows, s.num_q_tiles(p) * tile_rows);
      pl.part_count = std::size_t(pl.splits) * a.batch * a.heads * pl.part_rows;
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

  static int arch_of(context<cuda> const& ctx) { return tensor_cores ? device_arch(ctx.device) : 0; }

  template <class Policy>
  static std::size_t workspace_bytes(context<cuda> const& ctx, Policy const& policy, attention_args<T> const& a) {
    check(a);
    attn::validate(policy, a.seq, a.heads, /*read_pointers=*/false);
    auto const pl = make_plan(policy, a, arch_of(ctx));
    return workspace_size([&](workspace_carver& w) { carve(w, pl, a.head_dim); });
  }

  template <class Policy>
  static attention_launch_info describe(context<cuda> const& ctx, Policy const& policy, attention_args<T> const& a) {
    check(a);
    attn::validate(policy, a.seq, a.heads, /*read_pointers=*/false);
    auto const pl = make_plan(policy, a, arch_of(ctx));
    attention_launch_info info;
    info.warps = tensor_cores ? pl.warps : 0;
    info.tile_rows = pl.tile_rows;
    info.shared_pattern = pl.shared;
    info.band_kernel = pl.band_first;
    info.key_tail = pl.tail_global;
    info.key_splits = pl.splits;
    info.ordinary_passes = int(pl.plain.size());
    return info;
  }

  /// K/V stages and alignment slack of the tensor-core kernel on the current device: the most stages
  /// (3, else 2) with which the CTAs per SM the kernel is compiled for still fit the SM's shared
  /// memory, else the most that fit one block; the slack is the tuning's (cuda/tuning.cuh).
  struct kernel_shape {
    int stages = cuda_attention_max_stages;
    int slack = 0;
  };
  static constexpr int smem_bytes(int d, int warps, int stages, int slack) {
    return (rows_for(warps) + 2 * stages * cuda_attention_bn) * d * int(sizeof(T)) + slack;
  }
  template <int D, int W, class Seg>
  static kernel_shape shape_for_device() {
    int dev = 0, optin = 0, per_sm = 0, reserved = 0;
    DRDIFF_CUDA_CHECK(cudaGetDevice(&dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev));
    DRDIFF_CUDA_CHECK(cudaDeviceGetAttribute(&reserved, cudaDevAttrReservedSharedMemoryPerBlock, dev));
    cudaFuncAttributes fa{};
    DRDIFF_CUDA_CHECK(cudaFuncGetAttributes(&fa, attention_mma_kernel<T, D, cuda_attention_max_stages, W, Seg>));
    kernel_shape k;
    k.slack = cuda_attention_tuning_for(device_arch(dev)).smem_align;
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

  /// Whether the kernels of W warps are compiled for segment type Seg: the sparse tuning's always,
  /// the dense tuning's for policies that may take it (dense passes and a backend-chosen tile height).
  template <int W, class Seg, class Policy>
  static constexpr bool has_warps() {
    cuda_attention_tuning const t = cuda_attention_tuning_for(0);
    return W == t.sparse_warps ||
           (W == t.dense_warps && attn::detail::has_tiles<attn::bound_t<Policy>>::value &&
            attn::has_capabilities_v<Seg>);
  }
  /// Calls f(std::integral_constant<int, W>) for the compiled W equal to `warps`.
  template <class Seg, class Policy, class F>
  static void with_warps(int warps, F&& f) {
    if constexpr (has_warps<8, Seg, Policy>())
      if (warps == 8) return f(std::integral_constant<int, 8>{});
    if constexpr (has_warps<4, Seg, Policy>())
      if (warps == 4) return f(std::integral_constant<int, 4>{});
    DRDIFF_CHECK(false, "attention (cuda): no kernel of ", warps, " warps is compiled for this policy");
  }

  template <class Seg, class Policy>
  static kernel_shape shape_dim(int dim, int warps) {
    kernel_shape k{};
    if constexpr (tensor_cores)
      with_warps<Seg, Policy>(warps, [&](auto w) {
        k = dim == 64 ? shape_for_device<64, decltype(w)::value, Seg>() : shape_for_device<128, decltype(w)::value, Seg>();
      });
    return k;
  }

  template <int D, int W, class Seg>
  static void launch(cuda_attention_params<T, Seg> const& prm, dim3 grid, cudaStream_t stream, kernel_shape k,
                     bool band) {
    if constexpr (tensor_cores) {
      int const smem = smem_bytes(D, W, k.stages, k.slack);
      if constexpr (W == 4 && attn::has_capabilities_v<Seg>) {
        if (band) {
          auto const kernel =
              k.stages == 3 ? attention_band_kernel<T, D, 3, Seg> : attention_band_kernel<T, D, 2, Seg>;
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

  template <class Seg, class Policy>
  static void launch_dim(cuda_attention_params<T, Seg> const& prm, int warps, dim3 grid, cudaStream_t stream,
                         kernel_shape k, bool band = false) {
    if constexpr (tensor_cores) {
      with_warps<Seg, Policy>(warps, [&](auto w) {
        if (prm.dim == 64) launch<64, decltype(w)::value>(prm, grid, stream, k, band);
        else launch<128, decltype(w)::value>(prm, grid, stream, k, band);
      });
    } else {
      launch<0, 4>(prm, grid, stream, k, band);
    }
  }

  /// The parameters every launch of the call shares: tensors, scale, workspace (built once).
  template <class Policy>
  static cuda_attention_params<T, seg_t<Policy>> call_params(plan<Policy> const& pl, attention_args<T> const& a,
                                                             workspace_layout const& ws) {
    cuda_attention_params<T, seg_t<Policy>> prm{};
    prm.batch = a.batch; prm.seq = a.seq; prm.heads = a.heads; prm.dim = a.head_dim;
    prm.q = a.q; prm.k = a.k; prm.v = a.v; prm.o = a.o;
    prm.qs = a.q_strides; prm.ks = a.k_strides; prm.vs = a.v_strides; prm.os = a.o_strides;
    prm.lse = a.maybe_lse;
    prm.kv_lens = a.maybe_kv_lens;
    prm.scale_log2 = float(a.scale() * 1.4426950408889634);
    prm.tile_rows = pl.tile_rows;
    if (pl.state_rows) {
      prm.st_m = ws.st_m;
      prm.st_l = ws.st_l;
      prm.st_acc = ws.st_acc;
    }
    if (pl.part_count) {
      prm.part_m = ws.part_m;
      prm.part_l = ws.part_l;
      prm.part_acc = ws.part_acc;
      prm.part_rows = pl.part_rows;
    }
    return prm;
  }

  template <class Policy>
  static void run(context<cuda> const& ctx, Policy const& policy, attention_args<T> const& a, void* workspace,
                  std::size_t workspace_size) {
    using Seg = seg_t<Policy>;
    check(a);
    attn::validate(policy, a.seq, a.heads, /*read_pointers=*/false);
    auto const pl = make_plan(policy, a, arch_of(ctx));
    workspace_carver w(workspace);
    workspace_layout const ws = carve(w, pl, a.head_dim);
    std::size_t const need = w.bytes();
    DRDIFF_CHECK(workspace != nullptr || pl.state_rows + pl.part_count == 0,
                 "attention (cuda): this policy needs ", need, " bytes of workspace; pass a device buffer of "
                 "attention_workspace_bytes() bytes");
    DRDIFF_CHECK(workspace == nullptr || workspace_size >= need, "attention (cuda): workspace_bytes = ",
                 workspace_size, " is smaller than the ", need, " bytes attention_workspace_bytes() asks for");
    if (ctx.device >= 0) DRDIFF_CUDA_CHECK(cudaSetDevice(ctx.device));
    cudaStream_t const stream = cuda_stream(ctx);
    kernel_shape const shape = shape_dim<Seg, Policy>(a.head_dim, pl.warps);
    auto const call = call_params(pl, a, ws);
    bool const tables = pl.seg_entries > 0 && workspace != nullptr;
    // Heads in groups that fit the launch's table (one group when every head shares the policy).
    int const group = pl.shared ? a.heads : cuda_table_heads;
    for (int h0 = 0; h0 < a.heads; h0 += group)
      run_group<Policy>(pl, call, tables ? ws.seg_table : nullptr, tables ? ws.seg_count : nullptr, h0,
                        std::min(group, a.heads - h0), stream, shape);
#ifdef DRDIFF_DEBUG_SYNC
    DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
#endif
  }

  /// The launches of heads h0 .. h0 + hn − 1; seg_table null: the kernels collect their own segments.
  template <class Policy>
  static void run_group(plan<Policy> const& pl, cuda_attention_params<T, seg_t<Policy>> const& call,
                        cuda_segment* seg_table, int* seg_count, int h0, int hn, cudaStream_t stream,
                        kernel_shape shape) {
    using Seg = seg_t<Policy>;
    using params = cuda_attention_params<T, Seg>;
    int const batch = call.batch;
    params group = call;  // this group's heads (then only copied: every launch builds its own)
    group.head0 = h0;
    group.heads_in_launch = hn;
    group.table_size = pl.shared ? 1 : hn;
    for (int i = 0; i < group.table_size; ++i) group.table[i] = pl.heads[h0 + i];
    auto tiles = [&](int p) {
      int m = 0;
      for (int i = 0; i < hn; ++i) m = std::max(m, pl.heads[h0 + i].num_q_tiles(p));
      return m;
    };
    // Every ordinary pass's tile segments, resolved before the first pass by one launch per
    // cuda_segment_passes::max passes (one launch for every pattern); the last batch of passes rides
    // with the band kernel's launch when it runs first.
    struct segment_launch {
      cuda_segment_passes ps;
      int most = 0;  // tiles of the pass with the most
    };
    std::vector<segment_launch> pre;
    if (seg_table) {
      std::int64_t next = 0;  // first table entry of the next pass
      for (std::size_t i = pl.band_first ? 1 : 0; i < pl.plain.size(); ++i) {
        int const p = pl.plain[i], nt = tiles(p);
        if (nt == 0) continue;
        if (pre.empty() || pre.back().ps.n == cuda_segment_passes::max) pre.emplace_back();
        cuda_segment_passes& ps = pre.back().ps;
        ps.pass[ps.n] = p;
        ps.tail[ps.n] = pl.tail_global && i + 1 == pl.plain.size() ? 1 : 0;
        ps.tiles[ps.n] = nt;
        ps.offset[ps.n] = next;
        ps.n++;
        next += std::int64_t(nt) * group.table_size;
        pre.back().most = std::max(pre.back().most, nt);
      }
    }
    bool const band_runs = pl.band_first && tiles(pl.plain.front()) > 0;
    for (std::size_t i = 0; i < pre.size(); ++i) {
      if (band_runs && i + 1 == pre.size()) break;  // the band launch runs it, first
      attention_segments_kernel<T, Seg><<<dim3(unsigned((pre[i].most + 127) / 128), unsigned(group.table_size),
                                               unsigned(pre[i].ps.n)), 128, 0, stream>>>(group, pre[i].ps,
                                                                                           seg_table, seg_count);
      DRDIFF_CUDA_CHECK(cudaGetLastError());
    }
    // The key splits of the first key-split pass run in the launch of the first ordinary pass on the
    // general kernel (its CTAs first), when there is one; the merge follows the last ordinary pass
    // either way.
    int const co_pass = tensor_cores && !pl.split.empty() ? pl.split.front() : -1;
    bool co_done = false;
    std::int64_t seg_at = 0;  // the pass's first table entry: the pre-pass laid the tables out in this order
    for (std::size_t i = 0; i < pl.plain.size(); ++i) {
      int const p = pl.plain[i], nt = tiles(p);
      if (nt == 0) continue;
      bool const band = i == 0 && pl.band_first;  // (no table; the splits ride with a later pass)
      params prm = group;
      prm.pass = p;
      prm.first = i == 0;
      prm.last = i + 1 == pl.plain.size();
      prm.tail_global = pl.tail_global && prm.last ? 1 : 0;
      prm.split_keys = 0;
      prm.seg_table = seg_table && !band ? seg_table + seg_at * cuda_segment_batch : nullptr;
      prm.seg_count = seg_table && !band ? seg_count + seg_at : nullptr;
      prm.seg_tiles = nt;
      if (!band) seg_at += std::int64_t(nt) * group.table_size;
      if (band && !pre.empty()) {  // the segment pre-pass of the later passes, in the band launch's first CTAs
        prm.pre = pre.back().ps;
        prm.pre_table = seg_table;
        prm.pre_count = seg_count;
        prm.pre_blocks = (pre.back().most + 127) / 128;
        prm.pre_ctas = prm.pre_blocks * pre.back().ps.n;
      }
      if (co_pass >= 0 && !co_done && !band && tiles(co_pass) > 0) {
        prm.co_pass = co_pass;
        prm.co_tiles = tiles(co_pass);
        prm.co_split_keys = pl.split_keys;
        prm.co_ctas = prm.co_tiles * pl.splits;
        co_done = true;
      }
      params const& launch_prm = prm;  // complete: nothing changes it after this point
      launch_dim<Seg, Policy>(launch_prm, pl.warps,
                              dim3(unsigned(launch_prm.co_ctas + launch_prm.pre_ctas + nt), unsigned(batch * hn), 1),
                              stream, shape, band);
    }
    for (int p : pl.split) {
      int const nt = tiles(p);
      if (nt == 0) continue;
      params prm = group;
      prm.pass = p;
      prm.first = prm.last = 1;
      prm.tail_global = 0;
      prm.split_keys = pl.split_keys;
      params const& launch_prm = prm;
      if (!(co_done && p == co_pass))
        launch_dim<Seg, Policy>(launch_prm, pl.warps, dim3(unsigned(nt), unsigned(batch * hn), unsigned(pl.splits)),
                                stream, shape);
      attention_merge_kernel<T, Seg><<<dim3(unsigned(nt * pl.tile_rows), unsigned(batch * hn)), 128, 0, stream>>>(
          launch_prm, pl.splits);
      DRDIFF_CUDA_CHECK(cudaGetLastError());
    }
  }
};

}  // namespace detail

/// What drdiff::attention will launch on the GPU for these arguments (host only: it plans, launches
/// nothing): the kernel's warps and tile height, whether the band kernel, a key tail or key splits are
/// taken. Tests and benchmarks use it to show which path a policy's capabilities bought.
template <class Policy, class T>
attention_launch_info describe_attention(context<cuda> const& ctx, Policy const& policy, attention_args<T> const& args) {
  detail::check_policy<Policy>();
  return detail::attention_impl<cuda, T>::describe(ctx, policy, args);
}

DRDIFF_NAMESPACE_END
