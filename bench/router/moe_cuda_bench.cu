// The routed MoE FFN on the GPU (bf16, fp32 accumulation): 16K tokens, d_model 1024, d_ff 4096,
// E = 8, 16, 64 with top-1, top-2 and adaptive routing; against the same active parameters as one
// dense FFN (cuBLAS GEMMs of the same FLOPs) and a device copy, measured in the same run.

#include <drdiff/cuda.cuh>
#include <drdiff/cuda/moe.cuh>

#include <benchmark/benchmark.h>

#include "../support/cuda_buffers.cuh"
#include "../support/cuda_event_timer.cuh"

using namespace drdiff;
using namespace drdiff::router;

namespace {

constexpr int kT = 16384, kD = 1024, kF = 4096;

using bench::buffers;

template <class R>
void run(benchmark::State& state, R const& r) {
  int const E = int(state.range(0));
  auto const mode = static_cast<moe_gemm_mode>(state.range(1));
  buffers b;
  auto* x = b.random<__nv_bfloat16>(std::size_t(kT) * kD, 1, 2.f);
  auto* wr = b.random<__nv_bfloat16>(std::size_t(E) * kD, 2, 0.2f);
  auto* up = b.random<__nv_bfloat16>(std::size_t(E) * kF * kD, 3, 0.1f);
  auto* down = b.random<__nv_bfloat16>(std::size_t(E) * kD * kF, 4, 0.05f);
  auto* out = b.alloc<__nv_bfloat16>(std::size_t(kT) * kD);
  cublasHandle_t handle;
  cublasCreate(&handle);
  context<drdiff::cuda> ctx{};
  ctx.cublas = handle;
  moe_args<__nv_bfloat16> a;
  a.tokens = kT; a.d_model = kD; a.d_ff = kF; a.experts = E;
  a.x = x; a.w_router = wr; a.w_up = up; a.w_down = down; a.out = out;
  a.gemm_mode = mode;
  std::size_t const bytes = moe_workspace_bytes(ctx, r, a);
  void* ws = b.alloc<unsigned char>(bytes);
  moe_stats st;  // (the row counts; the timed calls ask for nothing)
  a.maybe_stats = &st;
  moe_forward(ctx, r, a, ws, bytes);
  a.maybe_stats = nullptr;
  double rows = 0;
  for (int v : st.tokens_per_expert) rows += v;
  bench::cuda_event_timer timer;
  for (auto _ : state) timer.time(state, 3, [&] { moe_forward(ctx, r, a, ws, bytes); });
  state.counters["tokens"] = benchmark::Counter(kT, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["active"] = rows / kT;
  state.counters["flops"] = benchmark::Counter(4.0 * kD * kF * rows, benchmark::Counter::kIsIterationInvariantRate);
  // The phases of one more call: expert GEMM rate, and the bytes/s of dispatch + combine (read + write).
  moe_timing ph;
  a.maybe_timing = &ph;
  moe_forward(ctx, r, a, ws, bytes);
  state.counters["route_ms"] = ph.route_ms;
  state.counters["dispatch_ms"] = ph.dispatch_ms;
  state.counters["experts_ms"] = ph.experts_ms;
  state.counters["combine_ms"] = ph.combine_ms;
  state.counters["activation_ms"] = ph.activation_ms;
  state.counters["gemm_TFLOPs"] = 4.0 * kD * kF * rows / (ph.gemm_ms * 1e-3) * 1e-12;
  state.counters["move_GBs"] = (ph.dispatch_bytes + ph.combine_bytes) / ((ph.dispatch_ms + ph.combine_ms) * 1e-3) * 1e-9;
  cublasDestroy(handle);
}

void BM_moe_top1_cuda(benchmark::State& s) { run(s, top_k{1, true}); }
void BM_moe_top2_cuda(benchmark::State& s) { run(s, top_k{2, true}); }
void BM_moe_adaptive_cuda(benchmark::State& s) { run(s, adaptive<entropy_score>{1, 4}); }
// Arguments: experts, and the GEMM mode: 0 automatic (the default), 1 one GEMM per expert, 2 grouped,
// 3 padded strided-batched (the forced modes at E = 64, where they differ most).
void moe_shapes(benchmark::internal::Benchmark* b) {
  b->ArgNames({"E", "gemm"});
  for (int e : {8, 16, 64}) b->Args({e, 0});
  for (int g : {1, 2, 3}) b->Args({64, g});
  b->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);
}
BENCHMARK(BM_moe_top1_cuda)->Apply(moe_shapes);
BENCHMARK(BM_moe_top2_cuda)->Apply(moe_shapes);
BENCHMARK(BM_moe_adaptive_cuda)->Apply(moe_shapes);

// The dense baselines: the two GEMMs of an FFN of width k·d_ff over every token (cuBLAS).
void BM_dense_ffn_cuda(benchmark::State& state) {
  int const k = int(state.range(0));
  buffers b;
  auto* x = b.alloc<__nv_bfloat16>(std::size_t(kT) * kD);
  auto* w1 = b.alloc<__nv_bfloat16>(std::size_t(k) * kF * kD);
  auto* h = b.alloc<__nv_bfloat16>(std::size_t(kT) * k * kF);
  auto* w2 = b.alloc<__nv_bfloat16>(std::size_t(kD) * k * kF);
  auto* y = b.alloc<__nv_bfloat16>(std::size_t(kT) * kD);
  cublasHandle_t handle;
  cublasCreate(&handle);
  auto ffn = [&] {
    drdiff::detail::gemm_abt(handle, kT, k * kF, kD, x, kD, w1, kD, h, k * kF);
    drdiff::detail::gemm_abt(handle, kT, kD, k * kF, h, k * kF, w2, k * kF, y, kD);
  };
  ffn();
  bench::cuda_event_timer timer;
  for (auto _ : state) timer.time(state, 5, ffn);
  state.counters["tokens"] = benchmark::Counter(kT, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["flops"] = benchmark::Counter(4.0 * kD * kF * k * kT, benchmark::Counter::kIsIterationInvariantRate);
  cublasDestroy(handle);
}
BENCHMARK(BM_dense_ffn_cuda)->ArgNames({"k"})->Arg(1)->Arg(2)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(5);

// The copy ceiling: a device-to-device copy of 256 MB; bytes moved = read + write.
void BM_copy_cuda(benchmark::State& state) {
  std::size_t const n = std::size_t(256) << 20;
  buffers b;
  auto* src = b.alloc<unsigned char>(n);
  auto* dst = b.alloc<unsigned char>(n);
  DRDIFF_CUDA_CHECK(cudaMemset(src, 1, n));
  bench::cuda_event_timer timer;
  for (auto _ : state) timer.time(state, 5, [&] { DRDIFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, cudaMemcpyDeviceToDevice)); });
  state.counters["move_GBs"] = benchmark::Counter(2.0 * n * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_copy_cuda)->UseManualTime()->Unit(benchmark::kMillisecond)->Iterations(10);

}  // namespace

BENCHMARK_MAIN();
