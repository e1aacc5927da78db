// Rounding to the nearest embedding on the GPU (anchor::round_to_nearest): 16K tokens against
// vocabularies of 32K and 50K at d = 128..1024, bf16 and fp32 inputs (fp32 scores), against one cuBLAS
// GEMM of the same shape (the score GEMM alone, 16-bit output for bf16) measured in the same run.

#include <drdiff/cuda.cuh>
#include <drdiff/cuda/anchor.cuh>

#include <benchmark/benchmark.h>

#include "../support/cuda_buffers.cuh"
#include "../support/cuda_event_timer.cuh"

using namespace drdiff;

namespace {

constexpr int kTokens = 16384;

// Times `call(h, table, x, b)` (set up by the caller) on a random table and random tokens; counters:
// tokens/s and useful FLOP/s (2·tokens·V·d, the score GEMM).
template <class T, class Make>
void measure(benchmark::State& state, Make&& make) {
  int const V = int(state.range(0)), d = int(state.range(1));
  bench::buffers b;
  T* table = b.random<T>(std::size_t(V) * d, 1, 2.f);
  T* x = b.random<T>(std::size_t(kTokens) * d, 2, 2.f);
  cublasHandle_t h;
  cublasCreate(&h);
  auto call = make(h, V, d, table, x, b);
  call();
  bench::cuda_event_timer timer;
  for (auto _ : state) timer.time(state, 3, call);
  state.counters["tokens"] = benchmark::Counter(kTokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] = benchmark::Counter(2.0 * kTokens * V * d, benchmark::Counter::kIsIterationInvariantRate);
  cublasDestroy(h);
}

template <class T>
void BM_round_cuda(benchmark::State& state) {
  measure<T>(state, [](cublasHandle_t h, int V, int d, T* table, T* x, bench::buffers& b) {
    anchor::nearest_embedding<T> p{table, V, d};
    anchor::token_shape const sh{1, kTokens, d};
    std::size_t const bytes = anchor::workspace_bytes(context<drdiff::cuda>{}, p, sh);
    void* ws = b.alloc<char>(bytes);
    int* ids = b.alloc<int>(kTokens);
    context<drdiff::cuda> ctx{};
    ctx.cublas = h;
    return [=] { anchor::round_to_nearest(ctx, p, sh, x, ids, static_cast<T*>(nullptr), ws, bytes); };
  });
}

// The ceiling: the score GEMM alone through cuBLAS, output in T (16-bit for bf16: half the bytes of
// the rounding's fp32 scores), issued as the rounding issues it (aligned main part + tail, rows
// padded to 32 columns) ...
template <class T>
void BM_round_gemm_cuda(benchmark::State& state) {
  measure<T>(state, [](cublasHandle_t h, int V, int d, T* table, T* x, bench::buffers& b) {
    int const ld = drdiff::detail::anchor_score_ld(V), main = V / 128 * 128;
    T* s = b.alloc<T>(std::size_t(kTokens) * ld);
    return [=] {
      drdiff::detail::gemm_abt(h, kTokens, main, d, x, d, table, d, s, ld);
      if (V > main) drdiff::detail::gemm_abt(h, kTokens, V - main, d, x, d, table + std::size_t(main) * d, d, s + main, ld);
    };
  });
}
// ... and as one plain call of the same shape.
template <class T>
void BM_round_gemm_plain_cuda(benchmark::State& state) {
  measure<T>(state, [](cublasHandle_t h, int V, int d, T* table, T* x, bench::buffers& b) {
    T* s = b.alloc<T>(std::size_t(kTokens) * V);
    return [=] { drdiff::detail::gemm_abt(h, kTokens, V, d, x, d, table, d, s, V); };
  });
}

void shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"V", "d"});
  for (int V : {32000, 50257})
    for (int d : {128, 256, 512, 1024}) b->Args({V, d});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
}

}  // namespace

BENCHMARK_TEMPLATE(BM_round_cuda, __nv_bfloat16)->Apply(shapes);
BENCHMARK_TEMPLATE(BM_round_gemm_cuda, __nv_bfloat16)->Apply(shapes);
BENCHMARK_TEMPLATE(BM_round_gemm_plain_cuda, __nv_bfloat16)->Apply(shapes);
BENCHMARK_TEMPLATE(BM_round_cuda, float)->Apply(shapes);
BENCHMARK_TEMPLATE(BM_round_gemm_cuda, float)->Apply(shapes);

BENCHMARK_MAIN();
