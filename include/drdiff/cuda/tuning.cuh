#pragma once
/// \file
/// The tuning of the CUDA backend, in one place: tile, stage, warp and split choices of the attention
/// kernels and the GEMM thresholds of the MoE, as constexpr selectors keyed on the compute
/// capability (major·10 + minor, detail::device_arch()). A new architecture gets its numbers here,
/// and only here; semantic policies never mention an SM version. Every number was measured on the
/// H100 (docs/benchmarks.md); the other architectures take the same until measured.
///
/// What the kernels are compiled with (the key chunk, the most stages, the registers per thread)
/// cannot depend on the device the host finds at run time, so those are plain constants; the
/// selectors hold what the host decides per call.

#include <drdiff/core/config.hpp>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

// ---- attention ------------------------------------------------------------------------------------

/// Keys per chunk of the tensor-core kernel (one barrier, one max/sum reduction and two MMA waits per
/// chunk; 128 measured slower on H100 at every occupancy).
inline constexpr int cuda_attention_bn = 64;
/// K/V shared-memory stages of the tensor-core kernel: 3 (chunk c + 2 loads while chunk c computes),
/// or 2 where 3 do not fit the device's shared memory (head_dim 128 on GPUs with 99 KB per block).
/// The host picks the count per device (attention_impl<cuda>::shape_for_device).
inline constexpr int cuda_attention_max_stages = 3;

/// Resident CTAs per SM the tensor-core kernel is compiled for, by head_dim and warps: it caps the
/// registers (65536 / (32 · warps · blocks)) at 128 for head_dim 64 and 255 for 128, and occupancy
/// is what hides the latency of this kernel's short chunks (measured on H100 with the mma.sync path
/// and 4 warps: 128 registers and 4 CTAs ran local attention 1.7× faster than 216 and 2).
/// DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D64 / _D128 override it.
constexpr int cuda_attention_min_blocks(int d, int warps) {
#ifdef DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D64
  if (d <= 64) return DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D64;
#endif
#ifdef DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D128
  if (d > 64) return DRDIFF_CUDA_ATTENTION_MIN_BLOCKS_D128;
#endif
  return d <= 64 ? 16 / warps : 8 / warps;
}

#ifdef DRDIFF_CUDA_ATTENTION_WARPS
static_assert(DRDIFF_CUDA_ATTENTION_WARPS == 4 || DRDIFF_CUDA_ATTENTION_WARPS == 8,
              "DRDIFF_CUDA_ATTENTION_WARPS must be 4 or 8 (64 or 128 query rows per tile)");
#endif

/// What the host decides per attention call.
struct cuda_attention_tuning {
  /// Warps of the tensor-core kernel (each owns 16 query rows of the tile; on sm_90a each group of 4
  /// is a warpgroup owning 64 rows). The rows of a tile share every K/V chunk loaded, so 8 warps halve
  /// the K/V traffic per row, but their warpgroups wait for each other at every chunk's barrier: 8
  /// when every pass of every head is dense, 4 for the rest, where tiles have few chunks and four
  /// independent CTAs per SM overlap one another's softmax and MMAs better (H100: dense 16K 3.15 ms
  /// with 8 warps vs 3.52 with 4; local 0.208 vs 0.190 ms, the HSA mask 0.637 vs 0.612 ms).
  /// DRDIFF_CUDA_ATTENTION_WARPS (4 or 8) forces one size for every pattern.
  int dense_warps = 8, sparse_warps = 4;
  /// Keys per split of a key-split pass (global rows): at least this many (more, shorter splits
  /// measured no faster on H100: the merge grows as the pass shrinks), and at most
  /// cuda_max_splits (64) splits.
  int split_min_keys = 2048;
  /// Alignment slack of the dynamic shared memory: 1024 bytes on compute capability 9.0 (the wgmma
  /// path's 128-byte-swizzled tiles need 1024-byte alignment), else none.
  int smem_align = 0;
  /// A window pass that starts its rows and carries no key tail runs on the band kernel
  /// (DRDIFF_CUDA_ATTENTION_NO_BAND turns it off, for comparisons).
  bool band_kernel = true;
};

constexpr cuda_attention_tuning cuda_attention_tuning_for(int arch) noexcept {
  cuda_attention_tuning t{};
#ifdef DRDIFF_CUDA_ATTENTION_WARPS
  t.dense_warps = t.sparse_warps = DRDIFF_CUDA_ATTENTION_WARPS;
#endif
#ifdef DRDIFF_CUDA_ATTENTION_NO_BAND
  t.band_kernel = false;
#endif
  if (arch == 90) t.smem_align = 1024;
  return t;
}

// ---- MoE --------------------------------------------------------------------------------------------

/// How the MoE issues its expert GEMMs when the caller leaves the choice to it
/// (router::moe_gemm_mode::automatic). On the H100 (d_model 1024, FFN 4096) padded batched reaches
/// 61–95 % of the dense GEMM rate at E = 8..64, per-expert GEMMs 27–89 %, grouped 38–42 %.
struct cuda_moe_tuning {
  /// One strided batched GEMM over every expert's rows padded to the largest, when the padding fits
  /// the slack of the expert buffers (balanced routing).
  bool padded_batched = true;
  /// Else one grouped GEMM per projection while the experts average fewer rows than this, else one
  /// GEMM per expert.
  int grouped_below_rows = 384;
  /// Padded batched: each expert's rows rounded up to a multiple of this.
  int pad_rows = 8;
};

constexpr cuda_moe_tuning cuda_moe_tuning_for(int /*arch*/) noexcept { return cuda_moe_tuning{}; }

/// The expert buffers hold the selections plus 1/cuda_moe_slack_divisor of them (and one row per
/// expert): the room padded batched GEMMs may use. Part of the workspace size, so not per device.
inline constexpr int cuda_moe_slack_divisor = 4;

// ---- anchors ----------------------------------------------------------------------------------------

/// Tokens per score block of the rounding to the nearest embedding (scores are chunk × vocabulary fp32
/// values of scratch).
inline constexpr int cuda_round_chunk_tokens = 2048;

}  // namespace detail
DRDIFF_NAMESPACE_END
