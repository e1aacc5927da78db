// CUDA attention benchmarks (bf16, batch 1, 16 heads, head_dim 64, bidirectional), timed with CUDA
// events, plus the bf16 GEMM ceiling through cuBLAS in the same binary.
//
// Counters: `flops` = useful FLOP/s (4·D·allowed pairs), `density`, and for the GEMM its FLOP/s.

#include <drdiff/cuda.cuh>

#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <climits>
#include <cstdint>
#include <random>
#include <vector>

#include <thrust/device_vector.h>

#include "../support/cuda_event_timer.cuh"

using namespace drdiff;

namespace {

constexpr int kHeads = 16;

__global__ void fill_random(__nv_bfloat16* p, std::size_t n, unsigned seed) {
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < n; i += std::size_t(gridDim.x) * blockDim.x) {
    unsigned x = unsigned(i) * 2654435761u ^ seed;
    x ^= x >> 13; x *= 0x5bd1e995u; x ^= x >> 15;
    p[i] = __float2bfloat16((x & 0xffffff) / float(0x1000000) * 3.4641f - 1.7320f);  // uniform, unit variance
  }
}

template <class T>
struct device_array {  // owned by Thrust; no fill is timed (the constructor runs before the loop)
  thrust::device_vector<T> v;
  T* ptr;
  explicit device_array(std::size_t n) : v(std::max<std::size_t>(n, 1)), ptr(thrust::raw_pointer_cast(v.data())) {}
};

template <class Policy>
void run_attention(benchmark::State& state, Policy const& policy, int dim = 64) {
  int const n = int(state.range(0));
  std::size_t const elems = std::size_t(n) * kHeads * dim;
  try {
    device_array<__nv_bfloat16> q(elems), k(elems), v(elems), o(elems);
    device_array<float> lse(std::size_t(n) * kHeads);
    fill_random<<<1024, 256>>>(q.ptr, elems, 1);
    fill_random<<<1024, 256>>>(k.ptr, elems, 2);
    fill_random<<<1024, 256>>>(v.ptr, elems, 3);
    auto a = make_attention_args<__nv_bfloat16>(q.ptr, k.ptr, v.ptr, o.ptr, 1, n, kHeads, dim);
    a.maybe_lse = lse.ptr;
    context<drdiff::cuda> const ctx{};
    std::size_t const ws_bytes = attention_workspace_bytes(ctx, policy, a);
    device_array<unsigned char> ws(ws_bytes);
    attention(ctx, policy, a, ws.ptr, ws_bytes);  // warm-up
    DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
    bench::cuda_event_timer timer;
    int const reps = n >= (1 << 19) ? 2 : 10;
    for (auto _ : state) timer.time(state, reps, [&] { attention(ctx, policy, a, ws.ptr, ws_bytes); });
    double const pairs = double(attn::allowed_pairs(policy, n, kHeads));
    state.counters["flops"] = benchmark::Counter(4.0 * dim * pairs, benchmark::Counter::kIsIterationInvariantRate);
    state.counters["density"] = pairs / (double(n) * n * kHeads);
    state.counters["workspace_MB"] = ws_bytes / 1e6;
  } catch (drdiff::error const& e) {
    state.SkipWithError(e.what());
  }
}

// The mask measured for FlexAttention in shared/notes/attention.md §8: w=256, δ=4, s=2048, 64 leading globals.
auto const hsa_mask = attn::local_window{256} | attn::dilated{4, 2048} | attn::global_tokens::first(64);

void BM_attention_dense_cuda(benchmark::State& s) { run_attention(s, attn::dense{}); }
void BM_attention_local_cuda(benchmark::State& s) { run_attention(s, attn::local_window{256}); }
void BM_attention_dilated_cuda(benchmark::State& s) { run_attention(s, attn::dilated{4, 2048}); }
void BM_attention_global_cuda(benchmark::State& s) { run_attention(s, attn::global_tokens::first(64)); }
void BM_attention_union_cuda(benchmark::State& s) { run_attention(s, hsa_mask); }
void BM_attention_hsa_cuda(benchmark::State& s) { run_attention(s, attn::hsa{}); }
void BM_attention_union_d128_cuda(benchmark::State& s) { run_attention(s, hsa_mask, 128); }

void sizes(benchmark::internal::Benchmark* b, int lo, int hi) {
  b->ArgNames({"seq"})->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);
  for (int n = lo; n <= hi; n *= 2) b->Arg(n);
}
BENCHMARK(BM_attention_dense_cuda)->Apply([](auto* b) { sizes(b, 4096, 16384); });
BENCHMARK(BM_attention_local_cuda)->Apply([](auto* b) { sizes(b, 16384, 131072); });
BENCHMARK(BM_attention_dilated_cuda)->Apply([](auto* b) { sizes(b, 16384, 131072); });
BENCHMARK(BM_attention_global_cuda)->Apply([](auto* b) { sizes(b, 16384, 131072); });
BENCHMARK(BM_attention_union_cuda)->Apply([](auto* b) { sizes(b, 16384, 131072); });
BENCHMARK(BM_attention_union_d128_cuda)->Apply([](auto* b) { sizes(b, 16384, 131072); });
BENCHMARK(BM_attention_hsa_cuda)->Apply([](auto* b) { sizes(b, 1024, 1 << 20); });

// The ceiling: one bf16 GEMM of 8192³ through cuBLAS (fp32 accumulation).
void BM_gemm_bf16_cuda(benchmark::State& state) {
  int const m = int(state.range(0));
  device_array<__nv_bfloat16> a(std::size_t(m) * m), b(std::size_t(m) * m), c(std::size_t(m) * m);
  fill_random<<<1024, 256>>>(a.ptr, std::size_t(m) * m, 4);
  fill_random<<<1024, 256>>>(b.ptr, std::size_t(m) * m, 5);
  cublasHandle_t handle;
  if (cublasCreate(&handle) != CUBLAS_STATUS_SUCCESS) {
    state.SkipWithError("cublasCreate failed");
    return;
  }
  float const one = 1.f, zero = 0.f;
  auto gemm = [&] {
    cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, &one, a.ptr, CUDA_R_16BF, m, b.ptr, CUDA_R_16BF, m, &zero,
                 c.ptr, CUDA_R_16BF, m, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  };
  gemm();
  DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  bench::cuda_event_timer timer;
  for (auto _ : state) timer.time(state, 20, gemm);
  state.counters["flops"] = benchmark::Counter(2.0 * m * m * double(m), benchmark::Counter::kIsIterationInvariantRate);
  cublasDestroy(handle);
}
BENCHMARK(BM_gemm_bf16_cuda)->Arg(8192)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(3);

}  // namespace

BENCHMARK_MAIN();
