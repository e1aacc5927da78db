#pragma once
/// \file
/// The routed MoE FFN on the GPU, the host side of router::moe_forward (router/moe.hpp) for
/// context<cuda>: router GEMM (cuBLAS) → the same router functors in a kernel (one thread per token) →
/// dropless dispatch by a stable CUB radix sort of (expert, entry) on ⌈log₂(E+1)⌉ bits → row gather
/// → per-expert GEMMs through cuBLAS on contiguous row ranges → activation → combine in each token's
/// selection order (no atomics). Element types float and __nv_bfloat16 (fp32 accumulation); the
/// router functor runs in fp32. The expert row counts are copied to the host once per call (cuBLAS
/// needs them as sizes). Shared experts run as dense FFNs over every token, added after the routed
/// experts; an optional capacity factor drops each expert's selections past ⌈cf·T·k/E⌉ in token
/// order, as on the CPU; router::expert_choice runs its own routing step (a segmented sort per
/// expert) and then the same dispatch, experts and combine. The kernels are in cuda/kernels/moe.cuh,
/// the GEMM thresholds in cuda/tuning.cuh; the cuBLAS handle is the context's. Link CUDA::cublas.

#include <drdiff/core/backend.hpp>
#include <drdiff/cuda/detail/blas.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/kernels/moe.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/cuda/tuning.cuh>
#include <drdiff/router/moe.hpp>
#include <drdiff/router/routers.hpp>

#include <cublas_v2.h>
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

inline bool moe_aligned16(void const* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

/// h ← act(h) (or silu(g)·h) over n values in place: 16-byte vectors when n and the pointers allow.
template <class T>
void moe_activate(T* h, T const* g, std::size_t n, bool swiglu, cudaStream_t stream) {
  if (n == 0) return;
  if (n % moe_vec<T> == 0 && moe_aligned16(h) && (!swiglu || moe_aligned16(g))) {
    std::size_t const chunks = n / moe_vec<T>;
    moe_activation_vec_kernel<<<stride_grid(chunks, 256, 16), 256, 0, stream>>>(h, g, chunks, swiglu ? 1 : 0);
  } else {
    moe_activation_kernel<<<unsigned(std::min<std::size_t>((n + 255) / 256, 4096)), 256, 0, stream>>>(h, g, n,
                                                                                                     swiglu ? 1 : 0);
  }
  DRDIFF_CUDA_CHECK(cudaGetLastError());
}

/// Sort keys 0 .. experts (experts = an unused slot): the bits of the radix sort.
inline int moe_key_bits(int experts) {
  int b = 1;
  while ((1 << b) <= experts) ++b;
  return b;
}

/// What the workspace of one call holds, from the arguments alone (host; the CUB size queries).
struct moe_sizes {
  std::size_t tokens = 0, entries = 0;  ///< tokens · width selections
  std::size_t capacity_rows = 0;        ///< rows of the expert buffers: the entries plus the slack for padding
  std::size_t sort_temp_bytes = 0, ec_temp_bytes = 0;
  int experts = 0, d = 0, f = 0;
  bool swiglu = false, shared = false, expert_choice = false;
};
template <class Router, class T>
moe_sizes moe_sizes_of(Router const& r, router::moe_args<T> const& a) {
  moe_sizes s;
  int const width = r.max_selected(a.experts);
  s.tokens = std::size_t(a.tokens);
  s.entries = s.tokens * std::size_t(width);
  s.capacity_rows = s.entries + s.entries / cuda_moe_slack_divisor + std::size_t(a.experts);
  s.experts = a.experts;
  s.d = a.d_model;
  s.f = a.d_ff;
  s.swiglu = a.act == router::activation::swiglu;
  s.shared = a.shared_experts > 0;
  DRDIFF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, s.sort_temp_bytes, static_cast<unsigned*>(nullptr),
                                                    static_cast<unsigned*>(nullptr), static_cast<unsigned*>(nullptr),
                                                    static_cast<unsigned*>(nullptr), s.entries, 0,
                                                    moe_key_bits(a.experts)));
  if constexpr (std::is_same_v<Router, router::expert_choice>) {
    s.expert_choice = true;
    std::size_t const n = s.tokens * std::size_t(a.experts);
    DRDIFF_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
        nullptr, s.ec_temp_bytes, static_cast<float const*>(nullptr), static_cast<float*>(nullptr),
        static_cast<int const*>(nullptr), static_cast<int*>(nullptr), int(n), a.experts,
        static_cast<int const*>(nullptr), static_cast<int const*>(nullptr)));
  }
  return s;
}

/// The workspace of one call, laid out by workspace_carver (the one description of its pieces).
template <class T>
struct moe_buffers {
  float* logits;                 ///< [tokens × experts] fp32 (expert choice: the probabilities)
  int *count, *expert;           ///< selections per token, [tokens × width] experts
  float* weight;                 ///< [tokens × width]
  unsigned *keys, *entries, *keys_sorted, *entries_sorted;
  int *slot_of, *bad, *row_pos;  ///< bad: [non-finite flag, counts per expert]
  T *xs, *h, *g, *y;             ///< expert intermediates in T (fp32 accumulation inside the GEMMs)
  void** ptrs;                   ///< grouped GEMMs: A, B, C pointers × 3 projections
  int* seg_start;                ///< [2 × experts]: each expert's first sorted row and kept rows
  T* shared;                     ///< Σ of the shared experts' outputs
  double* stat;                  ///< the statistics sums
  void* sort_temp;
  float *probT, *probT_sorted;   ///< expert choice: [experts × tokens]
  int *ids, *ids_sorted, *ec_seg;
  unsigned char* chosen;
  void* ec_temp;
};
template <class T>
moe_buffers<T> moe_carve(workspace_carver& w, moe_sizes const& s) {
  moe_buffers<T> b{};
  std::size_t const E = std::size_t(s.experts), cr = s.capacity_rows;
  b.logits = w.take<float>(s.tokens * E);
  b.count = w.take<int>(s.tokens);
  b.expert = w.take<int>(s.entries);
  b.weight = w.take<float>(s.entries);
  b.keys = w.take<unsigned>(s.entries);
  b.entries = w.take<unsigned>(s.entries);
  b.keys_sorted = w.take<unsigned>(s.entries);
  b.entries_sorted = w.take<unsigned>(s.entries);
  b.slot_of = w.take<int>(s.entries);
  b.bad = w.take<int>(E + 1);
  b.row_pos = w.take<int>(s.entries);
  b.xs = w.take<T>(cr * std::size_t(s.d));
  b.h = w.take<T>(cr * std::size_t(s.f));
  b.g = w.take<T>(s.swiglu ? cr * std::size_t(s.f) : 0);
  b.y = w.take<T>(cr * std::size_t(s.d));
  b.ptrs = w.take<void*>(9 * E);
  b.seg_start = w.take<int>(2 * E);
  b.shared = w.take<T>(s.shared ? s.tokens * std::size_t(s.d) : 0);
  b.stat = w.take<double>(2 * E + 2);
  b.sort_temp = w.take<unsigned char>(s.sort_temp_bytes);
  if (s.expert_choice) {
    std::size_t const n = s.tokens * E;
    b.probT = w.take<float>(n);
    b.probT_sorted = w.take<float>(n);
    b.ids = w.take<int>(n);
    b.ids_sorted = w.take<int>(n);
    b.ec_seg = w.take<int>(E + 1);
    b.chosen = w.take<unsigned char>(n);
    b.ec_temp = w.take<unsigned char>(s.ec_temp_bytes);
  }
  return b;
}

/// router::moe_forward on the GPU.
template <>
struct moe_impl<cuda> {
  template <class T>
  static void check_type() {
    static_assert(std::is_same_v<T, float> || std::is_same_v<T, __nv_bfloat16>,
                  "drdiff::router::moe_forward (cuda): the element type is float or __nv_bfloat16.");
  }

  template <class Router, class T>
  static std::size_t workspace_bytes(context<cuda> const&, Router const& r, router::moe_args<T> const& a) {
    check_type<T>();
    moe_sizes const s = moe_sizes_of(r, a);
    return workspace_size([&](workspace_carver& w) { moe_carve<T>(w, s); });
  }

  template <class Router, class T>
  static int forward(context<cuda> const& ctx, Router const& r, router::moe_args<T> const& a, void* workspace,
                     std::size_t workspace_bytes) {
    check_type<T>();
    check_moe_args(a);
    DRDIFF_CHECK(ctx.cublas != nullptr, "moe (cuda): context<cuda>::cublas is null; the MoE's GEMMs need the "
                 "caller's cuBLAS handle");
    r.validate(a.experts);
    if (a.tokens == 0) return 0;
    cudaStream_t const stream = cuda_stream(ctx);
    cublasHandle_t const blas = ctx.cublas;
    cublas_check(cublasSetStream(blas, stream), "cublasSetStream");
    router::moe_stats* const stats = a.maybe_stats;
    router::moe_timing* const timing = a.maybe_timing;
    int const T_ = a.tokens, E = a.experts, d = a.d_model, f = a.d_ff, width = r.max_selected(E);
    std::size_t const entries = std::size_t(T_) * width;
    moe_sizes const sizes = moe_sizes_of(r, a);
    workspace_carver w(workspace);
    moe_buffers<T> const buf = moe_carve<T>(w, sizes);
    std::size_t const need = w.bytes();
    DRDIFF_CHECK(workspace && workspace_bytes >= need, "moe (cuda): workspace_bytes = ", workspace_bytes,
                 " is smaller than the ", need, " bytes moe_workspace_bytes() asks for");
    float* const logits = buf.logits;
    int* const count = buf.count;
    int* const expert = buf.expert;
    float* const weight = buf.weight;
    unsigned* const keys = buf.keys;
    unsigned* const ent = buf.entries;
    unsigned* const keys_s = buf.keys_sorted;
    unsigned* const ent_s = buf.entries_sorted;
    int* const slot_of = buf.slot_of;
    int* const row_pos = buf.row_pos;
    int* const bad = buf.bad;
    T* const xs = buf.xs;
    T* const h = buf.h;
    T* const g = buf.g;
    T* const y = buf.y;

    cudaEvent_t ev[7] = {};
    if (timing)
      for (auto& e : ev) DRDIFF_CUDA_CHECK(cudaEventCreate(&e));
    auto mark = [&](int i) {
      if (timing) DRDIFF_CUDA_CHECK(cudaEventRecord(ev[i], stream));
    };
    mark(0);
    // 1. Router logits (fp32) and routing.
    gemm_abt(blas, T_, E, d, a.x, d, a.w_router, d, logits, E);
    DRDIFF_CUDA_CHECK(cudaMemsetAsync(bad, 0, sizeof(int) * (std::size_t(E) + 1), stream));
    if constexpr (std::is_same_v<Router, router::expert_choice>) {
      // Each expert's tokens by descending probability (a stable segmented sort: ties keep the lower
      // token first), its first c marked, then every token's list in increasing expert index.
      float* const probT = buf.probT;
      float* const probT_s = buf.probT_sorted;
      int* const ids = buf.ids;
      int* const ids_s = buf.ids_sorted;
      int* const seg = buf.ec_seg;
      unsigned char* const chosen = buf.chosen;
      int const c = r.per_expert(T_, E);
      moe_ec_softmax_kernel<<<(T_ + 127) / 128, 128, 0, stream>>>(logits, a.b_router, T_, E, probT, ids, bad);
      moe_ec_segments_kernel<<<(E + 1 + 255) / 256, 256, 0, stream>>>(seg, E, T_);
      DRDIFF_CUDA_CHECK(cudaGetLastError());
      std::size_t temp_bytes = sizes.ec_temp_bytes;
      DRDIFF_CUDA_CHECK(cub::DeviceSegmentedRadixSort::SortPairsDescending(
          buf.ec_temp, temp_bytes, probT, probT_s, ids, ids_s, T_ * E, E, seg, seg + 1, 0, int(sizeof(float) * 8),
          stream));
      DRDIFF_CUDA_CHECK(cudaMemsetAsync(chosen, 0, std::size_t(T_) * E, stream));
      std::size_t const marks = std::size_t(E) * c;
      moe_ec_mark_kernel<<<unsigned((marks + 255) / 256), 256, 0, stream>>>(ids_s, T_, E, c, chosen);
      moe_ec_lists_kernel<<<(T_ + 127) / 128, 128, 0, stream>>>(chosen, logits, T_, E, count, expert, weight,
                                                                         keys, ent);
    } else {
      double* stat = nullptr;
      if (stats) {
        stat = buf.stat;
        DRDIFF_CUDA_CHECK(cudaMemsetAsync(stat, 0, (2 * std::size_t(E) + 2) * sizeof(double), stream));
      }
      moe_route_kernel<<<(T_ + 127) / 128, 128, 0, stream>>>(r, logits, a.b_router, T_, E, width, a.timestep,
                                                                      a.maybe_token_scores, count, expert, weight,
                                                                      keys, ent, bad, stat);
    }
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    // 2. Stable sort of the entries by expert.
    std::size_t sort_temp = sizes.sort_temp_bytes;
    DRDIFF_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(buf.sort_temp, sort_temp, keys, keys_s, ent, ent_s, entries, 0,
                                                      moe_key_bits(E), stream));
    // 3. Row counts per expert on the host (the GEMM sizes): E + 1 integers, one synchronisation.
    std::size_t const hist_blocks = std::min<std::size_t>((entries + 255) / 256, 64);
    moe_histogram_kernel<<<unsigned(std::max<std::size_t>(hist_blocks, 1)), 256, 0, stream>>>(keys_s, entries, E,
                                                                                                       bad + 1);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    std::vector<int> flags(E + 1);
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(flags.data(), bad, flags.size() * sizeof(int), cudaMemcpyDeviceToHost, stream));
    std::vector<double> sums(2 * std::size_t(E) + 2, 0.0);
    bool const token_stats = stats && !std::is_same_v<Router, router::expert_choice>;
    if (token_stats)
      DRDIFF_CUDA_CHECK(cudaMemcpyAsync(sums.data(), buf.stat, sums.size() * sizeof(double), cudaMemcpyDeviceToHost,
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
    void** const ptr_base = buf.ptrs;
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
      cublas_check(
          cublasGemmGroupedBatchedEx(blas, ta.data(), tb.data(), m_arr.data(), n_arr.data(), k_arr.data(),
                                     alpha.data(), dp, cuda_type<T>(), lda.data(), dp + E,
                                     cuda_type<T>(), ldb.data(), beta.data(), dp + 2 * E, cuda_type<T>(),
                                     ldc.data(), groups, sizes.data(), CUBLAS_COMPUTE_32F),
          "cublasGemmGroupedBatchedEx");
    };
    int active = 0;
    int kept_rows = 0;
    for (int e = 0; e < E; ++e) active += len[e] > 0, kept_rows += len[e];
    int pitch_rows = 0;
    for (int e = 0; e < E; ++e) pitch_rows = std::max(pitch_rows, len[e]);
    cuda_moe_tuning const tune = cuda_moe_tuning_for(device_arch(ctx.device));
    pitch_rows = (pitch_rows + tune.pad_rows - 1) / tune.pad_rows * tune.pad_rows;
    bool const fits_padded = tune.padded_batched && std::size_t(E) * pitch_rows <= sizes.capacity_rows;
    router::moe_gemm_mode mode = a.gemm_mode;
    if (mode == router::moe_gemm_mode::padded_batched && !fits_padded) mode = router::moe_gemm_mode::per_expert;
    if (mode == router::moe_gemm_mode::automatic)  // measured on the H100 (docs/benchmarks.md): padded batched wins at
      mode = fits_padded ? router::moe_gemm_mode::padded_batched  // (cuda/tuning.cuh: cuda_moe_tuning)
             : active > 0 && kept_rows < tune.grouped_below_rows * active ? router::moe_gemm_mode::grouped
                                                      : router::moe_gemm_mode::per_expert;
    bool const use_grouped = mode == router::moe_gemm_mode::grouped;
    int const pitch = mode == router::moe_gemm_mode::padded_batched ? pitch_rows : 0;
    std::size_t const gemm_rows = pitch ? std::size_t(E) * pitch : std::size_t(rows);
    auto batched = [&](T const* w, std::size_t w_stride, int n_out, int k, T const* in, T* out) {
      float const one = 1.f, zero = 0.f;
      cublas_check(
          cublasGemmStridedBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n_out, pitch, k, &one, w, cuda_type<T>(),
                                     k, (long long)w_stride, in, cuda_type<T>(), k, (long long)pitch * k, &zero,
                                     out, cuda_type<T>(), n_out, (long long)pitch * n_out, E, CUBLAS_COMPUTE_32F,
                                     CUBLAS_GEMM_DEFAULT),
          "cublasGemmStridedBatchedEx");
    };
    // 4. Gather, expert GEMMs, activation, down projection (16-byte vectors when rows allow them).
    bool const vectorized = d % moe_vec<T> == 0 && moe_aligned16(a.x) &&
                            moe_aligned16(a.residual ? static_cast<void const*>(a.residual) : a.out);
    mark(1);
    if (rows > 0) {
      // The segment starts and kept counts (after the grouped GEMMs' pointer arrays).
      std::vector<int> sk(start);
      sk.insert(sk.end(), len.begin(), len.end());
      int* const d_seg = buf.seg_start;
      DRDIFF_CUDA_CHECK(cudaMemcpyAsync(d_seg, sk.data(), sk.size() * sizeof(int), cudaMemcpyHostToDevice, stream));
      moe_invert_kernel<<<(rows + 255) / 256, 256, 0, stream>>>(ent_s, keys_s, rows, d_seg, d_seg + E, pitch,
                                                                         slot_of, row_pos);
      if (vectorized) moe_gather_vec_kernel<<<rows, 128, 0, stream>>>(a.x, ent_s, row_pos, rows, width, d, xs);
      else moe_gather_kernel<<<rows, 128, 0, stream>>>(a.x, ent_s, row_pos, rows, width, d, xs);
      DRDIFF_CUDA_CHECK(cudaGetLastError());
    }
    mark(2);
    if (rows > 0) {
      if (pitch) {
        batched(a.w_up, std::size_t(f) * d, f, d, xs, h);
        if (a.act == router::activation::swiglu) batched(a.w_gate, std::size_t(f) * d, f, d, xs, g);
      } else if (use_grouped) {
        grouped(a.w_up, std::size_t(f) * d, f, d, xs, h, 0);
        if (a.act == router::activation::swiglu) grouped(a.w_gate, std::size_t(f) * d, f, d, xs, g, 1);
      } else {
        for (int e = 0; e < E; ++e) {
          int const b = start[e], n = len[e];
          std::size_t const off = std::size_t(e) * f * d;
          gemm_abt(blas, n, f, d, xs + std::size_t(b) * d, d, a.w_up + off, d, h + std::size_t(b) * f, f);
          if (a.act == router::activation::swiglu)
            gemm_abt(blas, n, f, d, xs + std::size_t(b) * d, d, a.w_gate + off, d, g + std::size_t(b) * f, f);
        }
      }
      std::size_t const hn = gemm_rows * f;  // padded rows are activated too (never combined)
      mark(5);
      moe_activate(h, g, hn, a.act == router::activation::swiglu, stream);
      mark(6);
      if (pitch) {
        batched(a.w_down, std::size_t(d) * f, d, f, h, y);
      } else if (use_grouped) {
        grouped(a.w_down, std::size_t(d) * f, d, f, h, y, 2);
      } else {
        for (int e = 0; e < E; ++e) {
          int const b = start[e], n = len[e];
          gemm_abt(blas, n, d, f, h + std::size_t(b) * f, f, a.w_down + std::size_t(e) * d * f, f,
                           y + std::size_t(b) * d, d);
        }
      }
    }
    // 5. Shared experts over every token (after the routed ones: h and g are free), summed in order.
    T* shared = nullptr;
    if (a.shared_experts > 0) {
      shared = buf.shared;
      std::size_t const hn = std::size_t(T_) * f;
      for (int s2 = 0; s2 < a.shared_experts; ++s2) {
        std::size_t const off = std::size_t(s2) * f * d;
        gemm_abt(blas, T_, f, d, a.x, d, a.w_shared_up + off, d, h, f);
        if (a.act == router::activation::swiglu) gemm_abt(blas, T_, f, d, a.x, d, a.w_shared_gate + off, d, g, f);
        moe_activate(h, g, hn, a.act == router::activation::swiglu, stream);
        gemm_abt(blas, T_, d, f, h, f, a.w_shared_down + std::size_t(s2) * d * f, f, shared, d,
                         s2 == 0 ? 0.f : 1.f);
      }
    }
    // 6. Combine in each token's selection order (then the shared sum).
    mark(3);
    if (vectorized)
      moe_combine_vec_kernel<<<T_, 128, 0, stream>>>(y, count, weight, width, d, T_, slot_of, shared, a.out,
                                                             a.residual);
    else
      moe_combine_kernel<<<T_, 128, 0, stream>>>(y, count, weight, width, d, T_, slot_of, shared, a.out,
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
};

}  // namespace detail
DRDIFF_NAMESPACE_END
