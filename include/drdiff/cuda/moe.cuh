#pragma once
/// \file
/// The routed MoE FFN on the GPU (the CUDA counterpart of cpu/moe.hpp): router GEMM (cuBLAS) →
/// the same router functors in a kernel (one thread per token) → dropless dispatch by a stable CUB
/// radix sort of (expert, entry) on ⌈log₂(E+1)⌉ bits → row gather → per-expert GEMMs through cuBLAS
/// on contiguous row ranges → activation → combine in each token's selection order (no atomics).
/// Element types float and __nv_bfloat16 (fp32 accumulation); the router functor runs in fp32.
/// The expert row counts are copied to the host once per call (cuBLAS needs them as sizes). Shared
/// experts run as dense FFNs over every token, added after the routed experts; an optional capacity
/// factor drops each expert's selections past ⌈cf·T·k/E⌉ in token order, as on the CPU;
/// router::expert_choice runs its own routing step (a segmented sort per expert) and then the same
/// dispatch, experts and combine.

#include <drdiff/core/backend.hpp>
#include <drdiff/cuda/detail/blas.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/router/routers.hpp>

#include <cublas_v2.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace router {

enum class cuda_activation { gelu, swiglu };

/// How the expert GEMMs are issued: one cuBLAS GEMM per expert, one grouped GEMM per projection
/// (cublasGemmGroupedBatchedEx), one strided batched GEMM over every expert's rows padded to the
/// largest expert (padded_batched; used only when the padding fits the workspace's 25 % slack), or
/// automatic: padded batched when it fits (balanced routing), else grouped below 384 rows per expert,
/// else one GEMM per expert. On the H100 (d_model 1024, FFN 4096) padded batched reaches 61–95 % of
/// the dense GEMM rate at E = 8..64, per-expert GEMMs 27–89 %, grouped 38–42 %.
enum class moe_gemm_mode { automatic, per_expert, grouped, padded_batched };

/// One MoE call on the GPU: device pointers, row-major, the same layouts as moe_args.
template <class T>
struct cuda_moe_args {
  int tokens = 0, d_model = 0, d_ff = 0, experts = 0;
  T const* x = nullptr;
  T const* w_router = nullptr;      ///< [experts × d_model]; logits accumulate in fp32
  float const* b_router = nullptr;  ///< fp32 [experts], optional
  T const* w_up = nullptr;
  T const* w_gate = nullptr;  ///< SwiGLU only
  T const* w_down = nullptr;
  T* out = nullptr;  ///< [tokens × d_model]; exactly one of out and residual is set
  /// Optional fp32 [tokens × d_model]: when set, the combined output is added to it in fp32 (a
  /// residual stream, the add fused into the combine) instead of being written to `out`.
  float* residual = nullptr;
  cuda_activation act = cuda_activation::gelu;
  int shared_experts = 0;            ///< always-on experts added to every token with weight 1 (DeepSeekMoE)
  T const* w_shared_up = nullptr;    ///< [shared × d_ff × d_model]
  T const* w_shared_gate = nullptr;  ///< [shared × d_ff × d_model], SwiGLU only
  T const* w_shared_down = nullptr;  ///< [shared × d_model × d_ff]
  float timestep = 0.f;
  /// [tokens] in device memory, passed to the router as token_info::score (router::external_score);
  /// null: 0 for every token, as on the CPU.
  float const* maybe_token_scores = nullptr;
  cublasHandle_t cublas = nullptr;  ///< the caller's handle (its stream is set to ctx.stream)
  moe_gemm_mode gemm_mode = moe_gemm_mode::automatic;
  float capacity_factor = 0.f;  ///< 0: dropless; > 0: each expert keeps its first ⌈cf·T·k/E⌉ rows in token order
};

/// Per-phase times of one moe_forward call (milliseconds, CUDA events; asking for them adds one
/// synchronisation at the end of the call).
struct cuda_moe_timing {
  float route_ms = 0;     ///< router GEMM, routing kernel, sort, histogram, the row-count copy
  float dispatch_ms = 0;  ///< slot inversion and the gather of token rows into expert order
  float experts_ms = 0;   ///< the expert GEMMs and the activation (= gemm_ms + activation_ms)
  float gemm_ms = 0;      ///< the expert GEMMs alone (up, gate and down projections)
  float activation_ms = 0;
  float combine_ms = 0;   ///< the weighted combine in selection order
  double dispatch_bytes = 0, combine_bytes = 0;  ///< bytes the gather and the combine move
};

namespace detail {

using drdiff::detail::cublas_check;
using drdiff::detail::cuda_type;
using drdiff::detail::gemm_abt;

/// stat (optional, 2E + 2 doubles): Σ_t p_t[e], argmax counts, Σ lse², Σ selections.
template <class Router>
__global__ void moe_route_kernel(Router r, float const* logits, float const* bias, int tokens, int experts, int width,
                                 float timestep, float const* scores, int* count, int* expert, float* weight,
                                 unsigned* keys,
                                 unsigned* entries, int* bad, double* stat) {
  int const t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  float z[max_experts];
  for (int e = 0; e < experts; ++e) {
    z[e] = logits[std::size_t(t) * experts + e] + (bias ? bias[e] : 0.f);
    if (!isfinite(z[e])) atomicExch(bad, 1);
  }
  token_info info;
  info.token = t;
  info.timestep = timestep;
  info.score = scores ? scores[t] : 0.f;
  int const n = r(z, experts, info, expert + std::size_t(t) * width, weight + std::size_t(t) * width);
  count[t] = n;
  if (stat) {  // the statistics, as the CPU computes them (atomics: only when asked for)
    float p[max_experts];
    float const lse = detail::softmax(z, experts, p);
    int best = 0;
    for (int e = 0; e < experts; ++e) {
      atomicAdd(stat + e, double(p[e]));
      best = p[e] > p[best] ? e : best;
    }
    atomicAdd(stat + experts + best, 1.0);
    atomicAdd(stat + 2 * experts, double(lse) * double(lse));
    atomicAdd(stat + 2 * experts + 1, double(n));
  }
  for (int j = 0; j < width; ++j) {
    std::size_t const entry = std::size_t(t) * width + j;
    keys[entry] = j < n ? unsigned(expert[entry]) : unsigned(experts);  // unused slots sort last
    entries[entry] = unsigned(entry);
  }
}

template <class T>
__global__ void moe_gather_kernel(T const* x, unsigned const* sorted_entries, int const* row_pos, int rows, int width,
                                  int d, T* xs) {
  int const r = blockIdx.x;
  if (r >= rows || row_pos[r] < 0) return;
  std::size_t const token = sorted_entries[r] / unsigned(width);
  for (int k = threadIdx.x; k < d; k += blockDim.x) xs[std::size_t(row_pos[r]) * d + k] = x[token * d + k];
}

/// The expert activation in fp32: GELU (erf) of u, or silu(g)·u for SwiGLU.
__device__ __forceinline__ float moe_act(float u, float g, int swiglu) {
  return swiglu ? u * g / (1.f + expf(-g)) : 0.5f * u * (1.f + erff(u * 0.70710678118654752f));
}

/// In place: h ← act(h) (GELU) or silu(g)·h (SwiGLU), computed in fp32, stored in T.
template <class T>
__global__ void moe_activation_kernel(T* h, T const* g, std::size_t n, int swiglu) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    h[i] = T(moe_act(float(h[i]), swiglu ? float(g[i]) : 0.f, swiglu));
}

template <class T>
__global__ void moe_combine_kernel(T const* y, int const* count, float const* weight, int width, int d, int tokens,
                                   int const* slot_of, T const* shared, T* out, float* residual) {
  int const t = blockIdx.x;
  if (t >= tokens) return;
  for (int k = threadIdx.x; k < d; k += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < count[t]; ++j) {
      std::size_t const entry = std::size_t(t) * width + j;
      int const slot = slot_of[entry];
      if (slot >= 0) acc += weight[entry] * float(y[std::size_t(slot) * d + k]);
    }
    if (shared) acc += float(shared[std::size_t(t) * d + k]);
    if (residual) residual[std::size_t(t) * d + k] += acc;
    else out[std::size_t(t) * d + k] = T(acc);
  }
}

/// 16-byte vector forms of the gather, activation and combine (rows a multiple of 16 bytes, aligned
/// pointers): one uint4 per thread and step instead of one element.
template <class T>
inline constexpr int moe_vec = int(16 / sizeof(T));

template <class T>
__global__ void moe_gather_vec_kernel(T const* x, unsigned const* sorted_entries, int const* row_pos, int rows,
                                      int width, int d, T* xs) {
  int const r = blockIdx.x;
  if (r >= rows || row_pos[r] < 0) return;
  std::size_t const token = sorted_entries[r] / unsigned(width);
  int const chunks = d / moe_vec<T>;
  uint4 const* src = reinterpret_cast<uint4 const*>(x + token * d);
  uint4* dst = reinterpret_cast<uint4*>(xs + std::size_t(row_pos[r]) * d);
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) dst[c] = src[c];
}

template <class T>
__global__ void moe_activation_vec_kernel(T* h, T const* g, std::size_t chunks, int swiglu) {
  constexpr int V = moe_vec<T>;
  for (std::size_t c = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; c < chunks;
       c += std::size_t(gridDim.x) * blockDim.x) {
    uint4 hv = reinterpret_cast<uint4*>(h)[c], gv{};
    if (swiglu) gv = reinterpret_cast<uint4 const*>(g)[c];
    T* he = reinterpret_cast<T*>(&hv);
    T const* ge = reinterpret_cast<T const*>(&gv);
#pragma unroll
    for (int k = 0; k < V; ++k) he[k] = T(moe_act(float(he[k]), swiglu ? float(ge[k]) : 0.f, swiglu));
    reinterpret_cast<uint4*>(h)[c] = hv;
  }
}

template <class T>
__global__ void moe_combine_vec_kernel(T const* y, int const* count, float const* weight, int width, int d, int tokens,
                                       int const* slot_of, T const* shared, T* out, float* residual) {
  constexpr int V = moe_vec<T>;
  int const t = blockIdx.x;
  if (t >= tokens) return;
  int const chunks = d / V, n = count[t];
  for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
    float acc[V] = {};
    for (int j = 0; j < n; ++j) {  // each token's selection order: the same sum on every run
      std::size_t const entry = std::size_t(t) * width + j;
      int const slot = slot_of[entry];
      if (slot < 0) continue;  // dropped by the capacity limit
      uint4 const v = reinterpret_cast<uint4 const*>(y + std::size_t(slot) * d)[c];
      T const* e = reinterpret_cast<T const*>(&v);
      float const w = weight[entry];
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += w * float(e[k]);
    }
    if (shared) {  // the shared experts' sum, added last (as on the CPU)
      uint4 const v = reinterpret_cast<uint4 const*>(shared + std::size_t(t) * d)[c];
      T const* e = reinterpret_cast<T const*>(&v);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] += float(e[k]);
    }
    if (residual) {  // V fp32 values: V / 4 float4 (16-byte aligned: d is a multiple of V)
      float4* const rp = reinterpret_cast<float4*>(residual + std::size_t(t) * d + std::size_t(c) * V);
#pragma unroll
      for (int k = 0; k < V / 4; ++k) {
        float4 r = rp[k];
        r.x += acc[4 * k]; r.y += acc[4 * k + 1]; r.z += acc[4 * k + 2]; r.w += acc[4 * k + 3];
        rp[k] = r;
      }
      continue;
    }
    uint4 o;
    T* oe = reinterpret_cast<T*>(&o);
#pragma unroll
    for (int k = 0; k < V; ++k) oe[k] = T(acc[k]);
    reinterpret_cast<uint4*>(out + std::size_t(t) * d)[c] = o;
  }
}

inline bool aligned16(void const* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

/// h ← act(h) (or silu(g)·h) over n values in place: 16-byte vectors when n and the pointers allow.
template <class T>
void moe_activate(T* h, T const* g, std::size_t n, bool swiglu, cudaStream_t stream) {
  if (n == 0) return;
  if (n % moe_vec<T> == 0 && aligned16(h) && (!swiglu || aligned16(g))) {
    std::size_t const chunks = n / moe_vec<T>;
    moe_activation_vec_kernel<<<drdiff::detail::stride_grid(chunks, 256, 16), 256, 0, stream>>>(
        h, g, chunks, swiglu ? 1 : 0);
  } else {
    moe_activation_kernel<<<unsigned(std::min<std::size_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(h, g, n,
                                                                                                     swiglu ? 1 : 0);
  }
  DRDIFF_CUDA_CHECK(cudaGetLastError());
}

// ---- expert choice: each expert's top-c tokens, then the same per-token lists as token choice ----

/// Softmax per token (fp32) in place in `prob` [T × E] and transposed into probT [E × T]; token ids.
static __global__ void moe_ec_softmax_kernel(float* prob, float const* bias, int tokens, int experts, float* probT,
                                             int* ids, int* bad) {
  int const t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  float z[max_experts], p[max_experts];
  for (int e = 0; e < experts; ++e) {
    z[e] = prob[std::size_t(t) * experts + e] + (bias ? bias[e] : 0.f);
    if (!isfinite(z[e])) atomicExch(bad, 1);
  }
  detail::softmax(z, experts, p);
  for (int e = 0; e < experts; ++e) {
    prob[std::size_t(t) * experts + e] = p[e];
    probT[std::size_t(e) * tokens + t] = p[e];
    ids[std::size_t(e) * tokens + t] = t;
  }
}
static __global__ void moe_ec_segments_kernel(int* seg, int experts, int tokens) {
  int const e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e <= experts) seg[e] = e * tokens;
}
/// chosen[t·E + e] = 1 for the first c tokens of each expert's descending order.
static __global__ void moe_ec_mark_kernel(int const* sorted_ids, int tokens, int experts, int c, unsigned char* chosen) {
  std::size_t const i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x;
  if (i >= std::size_t(experts) * c) return;
  int const e = int(i / c), k = int(i % c);
  chosen[std::size_t(sorted_ids[std::size_t(e) * tokens + k]) * experts + e] = 1;
}
/// Each token's experts in increasing index, weighted by their probabilities (the CPU's order).
static __global__ void moe_ec_lists_kernel(unsigned char const* chosen, float const* prob, int tokens, int experts,
                                           int* count, int* expert, float* weight, unsigned* keys, unsigned* entries) {
  int const t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= tokens) return;
  int n = 0;
  for (int e = 0; e < experts; ++e)
    if (chosen[std::size_t(t) * experts + e]) {
      std::size_t const entry = std::size_t(t) * experts + n++;
      expert[entry] = e;
      weight[entry] = prob[std::size_t(t) * experts + e];
    }
  count[t] = n;
  for (int j = 0; j < experts; ++j) {
    std::size_t const entry = std::size_t(t) * experts + j;
    keys[entry] = j < n ? unsigned(expert[entry]) : unsigned(experts);
    entries[entry] = unsigned(entry);
  }
}

/// The extra workspace of expert choice, appended after the common layout.
struct moe_ec_layout {
  std::size_t probT, probT_sorted, ids, ids_sorted, seg, chosen, temp, temp_bytes, total;
};
inline moe_ec_layout moe_ec_plan(int tokens, int experts) {
  moe_ec_layout l{};
  std::size_t const n = std::size_t(tokens) * experts;
  DRDIFF_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
      nullptr, l.temp_bytes, static_cast<float const*>(nullptr), static_cast<float*>(nullptr),
      static_cast<int const*>(nullptr), static_cast<int*>(nullptr), int(n), experts, static_cast<int const*>(nullptr),
      static_cast<int const*>(nullptr)));
  std::size_t off = 0;
  auto take = [&](std::size_t bytes) {
    std::size_t const at = off;
    off += (bytes + 255) / 256 * 256;
    return at;
  };
  l.probT = take(n * sizeof(float));
  l.probT_sorted = take(n * sizeof(float));
  l.ids = take(n * sizeof(int));
  l.ids_sorted = take(n * sizeof(int));
  l.seg = take((std::size_t(experts) + 1) * sizeof(int));
  l.chosen = take(n);
  l.temp = take(l.temp_bytes);
  l.total = off;
  return l;
}

/// counts[e] = number of selections of expert e (integer atomics: the counts are exact). Each block
/// counts in shared memory and adds its nonzero bins once (global atomics on E counters from every
/// thread serialise: 26 µs for 32K keys on the H100, against a few µs this way).
static __global__ void moe_histogram_kernel(unsigned const* keys, std::size_t n, int experts, int* counts) {
  __shared__ int bins[max_experts];
  for (int e = threadIdx.x; e < experts; e += blockDim.x) bins[e] = 0;
  __syncthreads();
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x)
    if (keys[i] < unsigned(experts)) atomicAdd(bins + keys[i], 1);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x)
    if (bins[e] != 0) atomicAdd(counts + e, bins[e]);
}

/// The row of each selection in the expert GEMMs' layout: sorted position r, or e·pitch + (r − seg[e])
/// when every expert's rows are padded to `pitch` (pitch 0: not padded); −1 when the capacity limit
/// drops it (expert e keeps its first kept[e] rows). slot_of is indexed by entry, row_pos by r.
static __global__ void moe_invert_kernel(unsigned const* sorted_entries, unsigned const* sorted_keys, int rows,
                                         int const* seg, int const* kept, int pitch, int* slot_of, int* row_pos) {
  int const r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  int const e = int(sorted_keys[r]), i = r - seg[e];
  int const pos = i >= kept[e] ? -1 : (pitch ? e * pitch + i : r);
  slot_of[sorted_entries[r]] = pos;
  row_pos[r] = pos;
}

/// Workspace layout of one call.
struct moe_layout {
  std::size_t logits, count, expert, weight, keys, entries, keys_sorted, entries_sorted, slot_of, row_pos, bad, xs, h,
      g, y, ptrs, shared, stat, sort_temp, total;
  std::size_t capacity_rows;  ///< rows the expert buffers hold: the entries plus 25 % for padding
};
template <class T>
moe_layout moe_plan(int tokens, int d, int f, int experts, int width, std::size_t sort_temp, bool swiglu,
                    bool shared = false) {
  moe_layout l{};
  std::size_t off = 0;
  auto take = [&](std::size_t bytes) {
    std::size_t const at = off;
    off += (bytes + 255) / 256 * 256;
    return at;
  };
  std::size_t const entries = std::size_t(tokens) * width;
  l.logits = take(std::size_t(tokens) * experts * sizeof(float));
  l.count = take(std::size_t(tokens) * sizeof(int));
  l.expert = take(entries * sizeof(int));
  l.weight = take(entries * sizeof(float));
  l.keys = take(entries * sizeof(unsigned));
  l.entries = take(entries * sizeof(unsigned));
  l.keys_sorted = take(entries * sizeof(unsigned));
  l.entries_sorted = take(entries * sizeof(unsigned));
  l.slot_of = take(entries * sizeof(int));
  l.bad = take(sizeof(int) * (std::size_t(experts) + 1));  // [non-finite flag, counts per expert]
  l.row_pos = take(entries * sizeof(int));
  l.capacity_rows = entries + entries / 4 + std::size_t(experts);
  std::size_t const cr = l.capacity_rows;
  l.xs = take(cr * d * sizeof(T));
  // Expert intermediates in T (bf16 halves their traffic; fp32 accumulation inside the GEMMs).
  l.h = take(cr * f * sizeof(T));
  l.g = take(swiglu ? cr * f * sizeof(T) : 0);
  l.y = take(cr * d * sizeof(T));
  l.ptrs = take(9 * std::size_t(experts) * sizeof(void*) + 2 * std::size_t(experts) * sizeof(int));  // grouped GEMMs: A, B, C pointers × 3 projections
  l.shared = take(shared ? std::size_t(tokens) * d * sizeof(T) : 0);  // Σ of the shared experts' outputs
  l.stat = take((2 * std::size_t(experts) + 2) * sizeof(double));      // statistics sums
  l.sort_temp = take(sort_temp);
  l.total = off + 256;
  return l;
}
inline int key_bits(int experts) {
  int b = 1;
  while ((1 << b) <= experts) ++b;  // keys 0 .. experts (experts = unused)
  return b;
}

}  // namespace detail

/// Bytes of device workspace moe_forward needs (query first, CUB style).
template <class T, class Router>
std::size_t moe_workspace_bytes(Router const& r, cuda_moe_args<T> const& a) {
  int const width = r.max_selected(a.experts);
  std::size_t const entries = std::size_t(a.tokens) * width;
  std::size_t sort_temp = 0;
  DRDIFF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_temp, static_cast<unsigned*>(nullptr),
                                                    static_cast<unsigned*>(nullptr), static_cast<unsigned*>(nullptr),
                                                    static_cast<unsigned*>(nullptr), entries, 0,
                                                    detail::key_bits(a.experts)));
  std::size_t extra = 0;
  if constexpr (std::is_same_v<Router, expert_choice>) extra = detail::moe_ec_plan(a.tokens, a.experts).total;
  return detail::moe_plan<T>(a.tokens, a.d_model, a.d_ff, a.experts, width, sort_temp,
                             a.act == cuda_activation::swiglu, a.shared_experts > 0).total + extra;
}

/// The routed MoE FFN on ctx.stream; `workspace` holds moe_workspace_bytes(...) bytes. Returns the
/// number of selections the capacity limit dropped (0 when dropless), after copying the per-expert
/// row counts (kept rows) to `tokens_per_expert` (host, size E) when given.
template <class T, class Router>
int moe_forward(context<cuda> const& ctx, Router const& r, cuda_moe_args<T> const& a, void* workspace,
                 std::size_t workspace_bytes, std::vector<int>* tokens_per_expert = nullptr,
                 cuda_moe_timing* timing = nullptr, moe_stats* stats = nullptr) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                "drdiff::router::moe_forward (cuda): element type float or __nv_bfloat16.");
  DRDIFF_CHECK(a.experts > 0 && a.experts <= max_experts, "moe: experts E = ", a.experts, " must be in 1..", max_experts);
  DRDIFF_CHECK(a.tokens >= 0 && a.d_model > 0 && a.d_ff > 0, "moe (cuda): tokens = ", a.tokens, ", d_model = ",
               a.d_model, ", d_ff = ", a.d_ff, " must be positive");
  DRDIFF_CHECK(a.x && a.w_router && a.w_up && a.w_down && (a.out || a.residual) && a.cublas,
               "moe (cuda): x, w_router, w_up, w_down, out (or residual) and the cuBLAS handle must be set");
  DRDIFF_CHECK(!(a.out && a.residual), "moe (cuda): out and residual are both set; the output goes to one of them");
  DRDIFF_CHECK(a.act != cuda_activation::swiglu || a.w_gate, "moe: SwiGLU needs w_gate");
  DRDIFF_CHECK(a.shared_experts >= 0, "moe: shared_experts = ", a.shared_experts, " must be >= 0");
  DRDIFF_CHECK(a.shared_experts == 0 || (a.w_shared_up && a.w_shared_down &&
                                         (a.act != cuda_activation::swiglu || a.w_shared_gate)),
               "moe: shared_experts = ", a.shared_experts, " but the shared expert weights are not set");
  r.validate(a.experts);
  DRDIFF_CHECK(std::isfinite(a.capacity_factor) && a.capacity_factor >= 0.f, "moe: capacity_factor = ",
               a.capacity_factor, " must be >= 0 (0 = dropless)");
  if (a.tokens == 0) return 0;
  auto const stream = reinterpret_cast<cudaStream_t>(ctx.stream);
  detail::cublas_check(cublasSetStream(a.cublas, stream), "cublasSetStream");
  int const T_ = a.tokens, E = a.experts, d = a.d_model, f = a.d_ff, width = r.max_selected(E);
  std::size_t const entries = std::size_t(T_) * width;
  std::size_t sort_temp = 0;
  DRDIFF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_temp, static_cast<unsigned*>(nullptr),
                                                    static_cast<unsigned*>(nullptr), static_cast<unsigned*>(nullptr),
                                                    static_cast<unsigned*>(nullptr), entries, 0, detail::key_bits(E)));
  auto const l = detail::moe_plan<T>(T_, d, f, E, width, sort_temp, a.act == cuda_activation::swiglu,
                                     a.shared_experts > 0);
  std::size_t need = l.total;
  if constexpr (std::is_same_v<Router, expert_choice>) need += detail::moe_ec_plan(T_, E).total;
  DRDIFF_CHECK(workspace && workspace_bytes >= need, "moe (cuda): workspace_bytes = ", workspace_bytes,
               " is smaller than the ", need, " bytes moe_workspace_bytes() asks for");
  auto* base = static_cast<unsigned char*>(workspace);
  base += (256 - reinterpret_cast<std::uintptr_t>(base) % 256) % 256;
  auto at = [&](std::size_t off) { return static_cast<void*>(base + off); };
  float* logits = static_cast<float*>(at(l.logits));
  int* count = static_cast<int*>(at(l.count));
  int* expert = static_cast<int*>(at(l.expert));
  float* weight = static_cast<float*>(at(l.weight));
  unsigned* keys = static_cast<unsigned*>(at(l.keys));
  unsigned* ent = static_cast<unsigned*>(at(l.entries));
  unsigned* keys_s = static_cast<unsigned*>(at(l.keys_sorted));
  unsigned* ent_s = static_cast<unsigned*>(at(l.entries_sorted));
  int* slot_of = static_cast<int*>(at(l.slot_of));
  int* row_pos = static_cast<int*>(at(l.row_pos));
  int* bad = static_cast<int*>(at(l.bad));
  T* xs = static_cast<T*>(at(l.xs));
  T* h = static_cast<T*>(at(l.h));
  T* g = static_cast<T*>(at(l.g));
  T* y = static_cast<T*>(at(l.y));

  cudaEvent_t ev[7] = {};
  if (timing)
    for (auto& e : ev) DRDIFF_CUDA_CHECK(cudaEventCreate(&e));
  auto mark = [&](int i) {
    if (timing) DRDIFF_CUDA_CHECK(cudaEventRecord(ev[i], stream));
  };
  mark(0);
  // 1. Router logits (fp32) and routing.
  detail::gemm_abt(a.cublas, T_, E, d, a.x, d, a.w_router, d, logits, E);
  DRDIFF_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int) * (std::size_t(E) + 1), stream));
  if constexpr (std::is_same_v<Router, expert_choice>) {
    // Each expert's tokens by descending probability (a stable segmented sort: ties keep the lower
    // token first), its first c marked, then every token's list in increasing expert index.
    auto const el = detail::moe_ec_plan(T_, E);
    auto* eb = base + l.total - 256;  // the expert-choice region follows the common layout
    auto ea = [&](std::size_t off) { return static_cast<void*>(eb + off); };
    float* probT = static_cast<float*>(ea(el.probT));
    float* probT_s = static_cast<float*>(ea(el.probT_sorted));
    int* ids = static_cast<int*>(ea(el.ids));
    int* ids_s = static_cast<int*>(ea(el.ids_sorted));
    int* seg = static_cast<int*>(ea(el.seg));
    auto* chosen = static_cast<unsigned char*>(ea(el.chosen));
    int const c = r.per_expert(T_, E);
    detail::moe_ec_softmax_kernel<<<(T_ + 127) / 128, 128, 0, stream>>>(logits, a.b_router, T_, E, probT, ids, bad);
    detail::moe_ec_segments_kernel<<<(E + 1 + 255) / 256, 256, 0, stream>>>(seg, E, T_);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    std::size_t temp_bytes = el.temp_bytes;
    DRDIFF_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        ea(el.temp), temp_bytes, probT, probT_s, ids, ids_s, T_ * E, E, seg, seg + 1, 0, int(sizeof(float) * 8),
        stream));
    DRDIFF_CUDA_CHECK(cudaMemsetAsync(chosen, 0, std::size_t(T_) * E, stream));
    std::size_t const marks = std::size_t(E) * c;
    detail::moe_ec_mark_kernel<<<unsigned((marks + 255) / 256), 256, 0, stream>>>(ids_s, T_, E, c, chosen);
    detail::moe_ec_lists_kernel<<<(T_ + 127) / 128, 128, 0, stream>>>(chosen, logits, T_, E, count, expert, weight,
                                                                       keys, ent);
  } else {
    double* stat = nullptr;
    if (stats) {
      stat = static_cast<double*>(at(l.stat));
      DRDIFF_CUDA_CHECK(cudaMemsetAsync(stat, 0, (2 * std::size_t(E) + 2) * sizeof(double), stream));
    }
    detail::moe_route_kernel<<<(T_ + 127) / 128, 128, 0, stream>>>(r, logits, a.b_router, T_, E, width, a.timestep,
                                                                    a.maybe_token_scores, count, expert, weight,
                                                                    keys, ent, bad, stat);
  }
  DRDIFF_CUDA_CHECK(cudaGetLastError());
  // 2. Stable sort of the entries by expert.
  void* temp = at(l.sort_temp);
  DRDIFF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, sort_temp, keys, keys_s, ent, ent_s, entries, 0,
                                                    detail::key_bits(E), stream));
  // 3. Row counts per expert on the host (the GEMM sizes): E + 1 integers, one synchronisation.
  std::size_t const hist_blocks = std::min<std::size_t>((entries + 255) / 256, 64);
  detail::moe_histogram_kernel<<<unsigned(std::max<std::size_t>(hist_blocks, 1)), 256, 0, stream>>>(keys_s, entries, E,
                                                                                                     bad + 1);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
  std::vector<int> flags(E + 1);
  DRDIFF_CUDA_CHECK(cudaMemcpyAsync(flags.data(), bad, flags.size() * sizeof(int), cudaMemcpyDeviceToHost, stream));
  std::vector<double> sums(2 * std::size_t(E) + 2, 0.0);
  bool const token_stats = stats && !std::is_same_v<Router, expert_choice>;
  if (token_stats)
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(sums.data(), at(l.stat), sums.size() * sizeof(double), cudaMemcpyDeviceToHost,
                                      stream));
  DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
  DRDIFF_CHECK(flags[0] == 0, "moe (cuda): a router logit is not finite");
  // Rows of expert e: sorted positions start[e] .. start[e] + len[e] (len < count when the capacity
  // limit drops the later tokens).
  std::vector<int> start(E, 0), len(E, 0);
  int rows = 0, dropped = 0;
  int const cap = a.capacity_factor > 0.f
                      ? int(std::ceil(double(a.capacity_factor) * T_ * width / E))
                      : std::numeric_limits<int>::max();
  for (int e = 0; e < E; ++e) {
    start[e] = rows;
    len[e] = std::min(flags[e + 1], cap);
    dropped += flags[e + 1] - len[e];
    rows += flags[e + 1];
  }
  if (tokens_per_expert) tokens_per_expert->assign(len.begin(), len.end());
  if (stats) {  // the same formulas as the CPU layer (expert choice: every expert takes c tokens)
    stats->tokens_per_expert.assign(len.begin(), len.end());
    stats->dropped = dropped;
    if (token_stats) {
      double loss = 0;
      for (int e = 0; e < E; ++e) loss += (sums[std::size_t(E + e)] / T_) * (sums[std::size_t(e)] / T_);
      stats->balance_loss = E * loss;
      stats->z_loss = sums[2 * std::size_t(E)] / T_;
      stats->mean_active = sums[2 * std::size_t(E) + 1] / T_;
    } else {
      double kept = 0;
      for (int v : len) kept += v;
      stats->mean_active = kept / T_;
      stats->balance_loss = 1.0;
      stats->z_loss = 0.0;
    }
  }
  // One grouped GEMM over the experts with rows: out[rows_e × n_out] = in[rows_e × k] · W_eᵀ, the
  // pointer arrays in the workspace (slot `which` of 3), the shapes on the host.
  void** const ptr_base = static_cast<void**>(at(l.ptrs));
  auto grouped = [&](T const* w, std::size_t w_stride, int n_out, int k, T const* in, T* out, int which) {
    std::vector<void const*> hp(3 * std::size_t(E));
    std::vector<int> m_arr, n_arr, k_arr, lda, ldb, ldc, sizes;
    std::vector<cublasOperation_t> ta, tb;
    std::vector<float> alpha, beta;
    int groups = 0;
    for (int e = 0; e < E; ++e) {
      int const b = start[e], n = len[e];
      if (n == 0) continue;
      hp[std::size_t(groups)] = w + std::size_t(e) * w_stride;                      // cuBLAS A: the weights
      hp[std::size_t(E + groups)] = in + std::size_t(b) * k;                       // cuBLAS B: the rows
      hp[std::size_t(2 * E + groups)] = out + std::size_t(b) * n_out;              // cuBLAS C
      ta.push_back(CUBLAS_OP_T); tb.push_back(CUBLAS_OP_N);
      m_arr.push_back(n_out); n_arr.push_back(n); k_arr.push_back(k);
      lda.push_back(k); ldb.push_back(k); ldc.push_back(n_out);
      alpha.push_back(1.f); beta.push_back(0.f); sizes.push_back(1);
      ++groups;
    }
    if (groups == 0) return;
    void** dp = ptr_base + 3 * std::size_t(E) * which;
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(dp, hp.data(), hp.size() * sizeof(void*), cudaMemcpyHostToDevice, stream));
    detail::cublas_check(
        cublasGemmGroupedBatchedEx(a.cublas, ta.data(), tb.data(), m_arr.data(), n_arr.data(), k_arr.data(),
                                   alpha.data(), dp, detail::cuda_type<T>(), lda.data(), dp + E,
                                   detail::cuda_type<T>(), ldb.data(), beta.data(), dp + 2 * E, detail::cuda_type<T>(),
                                   ldc.data(), groups, sizes.data(), CUBLAS_COMPUTE_32F),
        "cublasGemmGroupedBatchedEx");
  };
  int active = 0;
  int kept_rows = 0;
  for (int e = 0; e < E; ++e) active += len[e] > 0, kept_rows += len[e];
  int pitch_rows = 0;
  for (int e = 0; e < E; ++e) pitch_rows = std::max(pitch_rows, len[e]);
  pitch_rows = (pitch_rows + 7) / 8 * 8;
  bool const fits_padded = std::size_t(E) * pitch_rows <= l.capacity_rows;
  moe_gemm_mode mode = a.gemm_mode;
  if (mode == moe_gemm_mode::padded_batched && !fits_padded) mode = moe_gemm_mode::per_expert;
  if (mode == moe_gemm_mode::automatic)  // measured on the H100 (docs/benchmarks.md): padded batched wins at
    mode = fits_padded ? moe_gemm_mode::padded_batched  // E = 8..64; grouped helps only below ~384 rows
           : active > 0 && kept_rows < 384 * active ? moe_gemm_mode::grouped
                                                    : moe_gemm_mode::per_expert;
  bool const use_grouped = mode == moe_gemm_mode::grouped;
  int const pitch = mode == moe_gemm_mode::padded_batched ? pitch_rows : 0;
  std::size_t const gemm_rows = pitch ? std::size_t(E) * pitch : std::size_t(rows);
  auto batched = [&](T const* w, std::size_t w_stride, int n_out, int k, T const* in, T* out) {
    float const one = 1.f, zero = 0.f;
    detail::cublas_check(
        cublasGemmStridedBatchedEx(a.cublas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, pitch, k, &one, w, detail::cuda_type<T>(),
                                   k, (long long)w_stride, in, detail::cuda_type<T>(), k, (long long)pitch * k, &zero,
                                   out, detail::cuda_type<T>(), n_out, (long long)pitch * n_out, E, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT),
        "cublasGemmStridedBatchedEx");
  };
  // 4. Gather, expert GEMMs, activation, down projection (16-byte vectors when rows allow them).
  bool const vectorized = d % detail::moe_vec<T> == 0 && detail::aligned16(a.x) &&
                          detail::aligned16(a.residual ? static_cast<void const*>(a.residual) : a.out);
  mark(1);
  if (rows > 0) {
    // The segment starts and kept counts (after the grouped GEMMs' pointer arrays).
    std::vector<int> sk(start);
    sk.insert(sk.end(), len.begin(), len.end());
    int* d_seg = reinterpret_cast<int*>(ptr_base + 9 * std::size_t(E));
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(d_seg, sk.data(), sk.size() * sizeof(int), cudaMemcpyHostToDevice, stream));
    detail::moe_invert_kernel<<<(rows + 255) / 256, 256, 0, stream>>>(ent_s, keys_s, rows, d_seg, d_seg + E, pitch,
                                                                       slot_of, row_pos);
    if (vectorized) detail::moe_gather_vec_kernel<<<rows, 128, 0, stream>>>(a.x, ent_s, row_pos, rows, width, d, xs);
    else detail::moe_gather_kernel<<<rows, 128, 0, stream>>>(a.x, ent_s, row_pos, rows, width, d, xs);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
  mark(2);
  if (rows > 0) {
    if (pitch) {
      batched(a.w_up, std::size_t(f) * d, f, d, xs, h);
      if (a.act == cuda_activation::swiglu) batched(a.w_gate, std::size_t(f) * d, f, d, xs, g);
    } else if (use_grouped) {
      grouped(a.w_up, std::size_t(f) * d, f, d, xs, h, 0);
      if (a.act == cuda_activation::swiglu) grouped(a.w_gate, std::size_t(f) * d, f, d, xs, g, 1);
    } else {
      for (int e = 0; e < E; ++e) {
        int const b = start[e], n = len[e];
        std::size_t const off = std::size_t(e) * f * d;
        detail::gemm_abt(a.cublas, n, f, d, xs + std::size_t(b) * d, d, a.w_up + off, d, h + std::size_t(b) * f, f);
        if (a.act == cuda_activation::swiglu)
          detail::gemm_abt(a.cublas, n, f, d, xs + std::size_t(b) * d, d, a.w_gate + off, d, g + std::size_t(b) * f, f);
      }
    }
    std::size_t const hn = gemm_rows * f;  // padded rows are activated too (never combined)
    mark(5);
    detail::moe_activate(h, g, hn, a.act == cuda_activation::swiglu, stream);
    mark(6);
    if (pitch) {
      batched(a.w_down, std::size_t(d) * f, d, f, h, y);
    } else if (use_grouped) {
      grouped(a.w_down, std::size_t(d) * f, d, f, h, y, 2);
    } else {
      for (int e = 0; e < E; ++e) {
        int const b = start[e], n = len[e];
        detail::gemm_abt(a.cublas, n, d, f, h + std::size_t(b) * f, f, a.w_down + std::size_t(e) * d * f, f,
                         y + std::size_t(b) * d, d);
      }
    }
  }
  // 5. Shared experts over every token (after the routed ones: h and g are free), summed in order.
  T* shared = nullptr;
  if (a.shared_experts > 0) {
    shared = static_cast<T*>(at(l.shared));
    std::size_t const hn = std::size_t(T_) * f;
    for (int s2 = 0; s2 < a.shared_experts; ++s2) {
      std::size_t const off = std::size_t(s2) * f * d;
      detail::gemm_abt(a.cublas, T_, f, d, a.x, d, a.w_shared_up + off, d, h, f);
      if (a.act == cuda_activation::swiglu) detail::gemm_abt(a.cublas, T_, f, d, a.x, d, a.w_shared_gate + off, d, g, f);
      detail::moe_activate(h, g, hn, a.act == cuda_activation::swiglu, stream);
      detail::gemm_abt(a.cublas, T_, d, f, h, f, a.w_shared_down + std::size_t(s2) * d * f, f, shared, d,
                       s2 == 0 ? 0.f : 1.f);
    }
  }
  // 6. Combine in each token's selection order (then the shared sum).
  mark(3);
  if (vectorized)
    detail::moe_combine_vec_kernel<<<T_, 128, 0, stream>>>(y, count, weight, width, d, T_, slot_of, shared, a.out,
                                                           a.residual);
  else
    detail::moe_combine_kernel<<<T_, 128, 0, stream>>>(y, count, weight, width, d, T_, slot_of, shared, a.out,
                                                       a.residual);
  DRDIFF_CUDA_CHECK(cudaGetLastError());
  mark(4);
  if (timing) {
    DRDIFF_CUDA_CHECK(cudaEventSynchronize(ev[4]));
    float* out[4] = {&timing->route_ms, &timing->dispatch_ms, &timing->experts_ms, &timing->combine_ms};
    for (int i = 0; i < 4; ++i) DRDIFF_CUDA_CHECK(cudaEventElapsedTime(out[i], ev[i], ev[i + 1]));
    timing->activation_ms = 0;
    if (rows > 0) DRDIFF_CUDA_CHECK(cudaEventElapsedTime(&timing->activation_ms, ev[5], ev[6]));
    timing->gemm_ms = timing->experts_ms - timing->activation_ms;
    for (auto& e : ev) cudaEventDestroy(e);
    timing->dispatch_bytes = double(rows) * (2.0 * d * sizeof(T) + sizeof(unsigned) + sizeof(int));
    timing->combine_bytes = double(rows) * d * sizeof(T) +  // the expert rows, then out or residual r/w
                            (a.residual ? 2.0 * T_ * d * sizeof(float) : double(T_) * d * sizeof(T));
  }
  return dropped;
}

}  // namespace router
DRDIFF_NAMESPACE_END
