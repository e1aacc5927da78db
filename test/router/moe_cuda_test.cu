// The GPU MoE equals the CPU MoE: fp32 ≤ 1e-5 relative for several routers, both activations, both
// GEMM modes and shared experts; bf16 within 1e-2.

#include <drdiff/cpu/moe.hpp>
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/moe.cuh>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <list>
#include <random>
#include <vector>

#include <thrust/device_vector.h>

using namespace drdiff;
using namespace drdiff::router;

namespace {

/// The result of one GPU-vs-CPU comparison: each token's largest difference relative to the largest
/// CPU output, and whether the per-expert row counts agree.
struct comparison {
  std::vector<double> token_error;
  bool same_counts = false;
  int dropped_cpu = 0, dropped_gpu = 0;
  bool out_untouched = true;  // the residual form left `out` as it was
  moe_stats cpu_stats, gpu_stats;
  double worst() const { return *std::max_element(token_error.begin(), token_error.end()); }
  double within(double tol) const {
    return double(std::count_if(token_error.begin(), token_error.end(), [&](double e) { return e <= tol; })) /
           double(token_error.size());
  }
};

/// Runs the CPU layer in fp32 and the GPU layer in T on the same values (for bf16, the CPU sees the
/// bf16-rounded inputs and weights, so only the GPU's bf16 arithmetic differs).
template <class T, class R>
comparison compare(R const& r, bool swiglu, unsigned seed, moe_gemm_mode mode = moe_gemm_mode::automatic,
                   int shared = 0, float capacity = 0.f, bool residual = false, int d = 64) {
  int const T_ = 300, f = 128, E = 8;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto make = [&](std::size_t n, float s) {
    std::vector<float> v(n);
    for (auto& e : v) e = float(T(s * nd(rng)));  // representable in T
    return v;
  };
  auto x = make(std::size_t(T_) * d, 1.f), wr = make(std::size_t(E) * d, 0.125f), br = make(E, 0.1f);
  auto up = make(std::size_t(E) * f * d, 0.125f), gate = make(std::size_t(E) * f * d, 0.125f);
  auto down = make(std::size_t(E) * d * f, 0.09f);
  int const S = std::max(shared, 1);
  auto sup = make(std::size_t(S) * f * d, 0.125f), sgate = make(std::size_t(S) * f * d, 0.125f);
  auto sdown = make(std::size_t(S) * d * f, 0.09f);
  std::vector<float> out_cpu(std::size_t(T_) * d);
  moe_args<float> a;
  a.tokens = T_; a.d_model = d; a.d_ff = f; a.experts = E;
  a.x = x.data(); a.w_router = wr.data(); a.b_router = br.data(); a.w_up = up.data(); a.w_gate = gate.data();
  a.w_down = down.data(); a.out = out_cpu.data();
  a.act = swiglu ? activation::swiglu : activation::gelu;
  a.shared_experts = shared;
  a.capacity_factor = capacity;
  a.w_shared_up = sup.data(); a.w_shared_gate = sgate.data(); a.w_shared_down = sdown.data();
  // Per-token scores for router::external_score (other routers ignore them), the same on both sides.
  std::vector<float> scores(static_cast<std::size_t>(T_));
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  for (auto& v : scores) v = ud(rng);
  a.maybe_token_scores = scores.data();
  moe_stats st;
  a.maybe_stats = &st;
  moe_forward(context<cpu>{}, r, a);

  std::list<thrust::device_vector<unsigned char>> owned;  // device memory owned by Thrust (stable addresses)
  auto upload = [&](void const* src, std::size_t bytes) {
    auto const* b = static_cast<unsigned char const*>(src);
    owned.emplace_back(b, b + bytes);
    return static_cast<void*>(thrust::raw_pointer_cast(owned.back().data()));
  };
  auto dev = [&](std::vector<float> const& h) {
    std::vector<T> t(h.begin(), h.end());
    return static_cast<T*>(upload(t.data(), t.size() * sizeof(T)));
  };
  T *dx = dev(x), *dwr = dev(wr), *dup = dev(up), *dgate = dev(gate), *ddown = dev(down);
  T* dout = dev(std::vector<float>(std::size_t(T_) * d, std::nanf("")));
  T *dsup = dev(sup), *dsgate = dev(sgate), *dsdown = dev(sdown);
  auto* dbr = static_cast<float*>(upload(br.data(), br.size() * sizeof(float)));
  auto* dscores = static_cast<float*>(upload(scores.data(), scores.size() * sizeof(float)));
  cublasHandle_t handle;
  REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
  moe_args<T> g;
  g.tokens = T_; g.d_model = d; g.d_ff = f; g.experts = E;
  g.x = dx; g.w_router = dwr; g.b_router = dbr; g.w_up = dup; g.w_gate = dgate; g.w_down = ddown; g.out = dout;
  g.act = swiglu ? activation::swiglu : activation::gelu;
  g.gemm_mode = mode;
  g.shared_experts = shared;
  g.capacity_factor = capacity;
  g.w_shared_up = dsup; g.w_shared_gate = dsgate; g.w_shared_down = dsdown;
  g.maybe_token_scores = dscores;
  // The residual form: the output is added to an fp32 buffer of random values (out is not written).
  std::vector<float> base(std::size_t(T_) * d);
  bool c_out_untouched = true;
  float* dres = nullptr;
  if (residual) {
    for (auto& v : base) v = nd(rng);
    dres = static_cast<float*>(upload(base.data(), base.size() * sizeof(float)));
    g.residual = dres;
    g.out = nullptr;
  }
  context<drdiff::cuda> ctx{};  // drdiff::cuda: libcu++ declares a ::cuda too
  ctx.cublas = handle;
  std::size_t const bytes = moe_workspace_bytes(ctx, r, g);
  owned.emplace_back(std::max<std::size_t>(bytes, 1));
  void* ws = thrust::raw_pointer_cast(owned.back().data());
  moe_stats gs;
  g.maybe_stats = &gs;
  int const dropped = moe_forward(ctx, r, g, ws, bytes);
  std::vector<int> const& per_expert = gs.tokens_per_expert;
  std::vector<double> out_gpu(std::size_t(T_) * d);
  if (residual) {
    std::vector<float> r(out_gpu.size());
    DRDIFF_CUDA_CHECK(cudaMemcpy(r.data(), dres, r.size() * sizeof(float), cudaMemcpyDeviceToHost));
    for (std::size_t i = 0; i < r.size(); ++i) out_gpu[i] = double(r[i]) - double(base[i]);
    std::vector<T> untouched(out_gpu.size());
    DRDIFF_CUDA_CHECK(cudaMemcpy(untouched.data(), dout, untouched.size() * sizeof(T), cudaMemcpyDeviceToHost));
    c_out_untouched = std::all_of(untouched.begin(), untouched.end(), [](T v) { return std::isnan(float(v)); });
  } else {
    std::vector<T> o(out_gpu.size());
    DRDIFF_CUDA_CHECK(cudaMemcpy(o.data(), dout, o.size() * sizeof(T), cudaMemcpyDeviceToHost));
    for (std::size_t i = 0; i < o.size(); ++i) out_gpu[i] = double(float(o[i]));
  }
  double mag = 0;
  for (float v : out_cpu) mag = std::max(mag, double(std::abs(v)));
  comparison c;
  c.out_untouched = c_out_untouched;
  c.token_error.assign(std::size_t(T_), 0.0);
  for (std::size_t i = 0; i < out_gpu.size(); ++i) {
    double const v = out_gpu[i];
    c.token_error[i / d] = std::max(c.token_error[i / d], std::isfinite(v) ? std::abs(v - out_cpu[i]) / mag : INFINITY);
  }
  c.same_counts = per_expert == st.tokens_per_expert;
  c.dropped_cpu = st.dropped;
  c.dropped_gpu = dropped;
  c.cpu_stats = st;
  c.gpu_stats = gs;
  cublasDestroy(handle);
  return c;
}

template <class R>
void equal_fp32(R const& r, bool swiglu, unsigned seed, moe_gemm_mode mode = moe_gemm_mode::automatic,
                int shared = 0, float capacity = 0.f) {
  auto const c = compare<float>(r, swiglu, seed, mode, shared, capacity);
  REQUIRE(c.dropped_gpu == c.dropped_cpu);
  // The statistics: the same formulas on both backends.
  REQUIRE(c.gpu_stats.tokens_per_expert == c.cpu_stats.tokens_per_expert);
  REQUIRE(c.gpu_stats.dropped == c.cpu_stats.dropped);
  REQUIRE(c.gpu_stats.mean_active == Approx(c.cpu_stats.mean_active).epsilon(1e-12));
  REQUIRE(c.gpu_stats.balance_loss == Approx(c.cpu_stats.balance_loss).epsilon(1e-5));
  REQUIRE(c.gpu_stats.z_loss == Approx(c.cpu_stats.z_loss).epsilon(1e-5));
  if (capacity > 0.f && capacity < 0.9f) REQUIRE(c.dropped_gpu > 0);
  INFO("relative difference " << c.worst());
  REQUIRE(c.worst() <= 1e-5);
  REQUIRE(c.same_counts);
}

}  // namespace

TEST_CASE("the CUDA MoE equals the CPU MoE", "[router][moe][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  equal_fp32(top_k{2, true}, false, seed);
  equal_fp32(top_k{1, false}, true, seed + 1);
  equal_fp32(top_p{0.5f, 1, 4, false}, false, seed + 2);
  equal_fp32(adaptive<entropy_score>{1, 4}, true, seed + 3);
  equal_fp32(adaptive<external_score>{1, 4}, false, seed + 10);  // per-token scores (were 0 on the GPU)
  equal_fp32(top_k{2, true}, true, seed + 4, moe_gemm_mode::grouped);     // one grouped GEMM per projection
  equal_fp32(top_k{2, true}, false, seed + 5, moe_gemm_mode::per_expert);  // one GEMM per expert
  equal_fp32(top_k{1, true}, false, seed + 6, moe_gemm_mode::automatic, 2);  // two shared experts
  equal_fp32(top_k{2, true}, true, seed + 7, moe_gemm_mode::automatic, 1);   // a shared SwiGLU expert
  equal_fp32(top_k{2, true}, false, seed + 8, moe_gemm_mode::per_expert, 0, 0.6f);  // capacity: drops
  equal_fp32(top_k{1, true}, true, seed + 9, moe_gemm_mode::grouped, 1, 0.5f);      // drops, grouped, shared
  equal_fp32(top_k{2, true}, false, seed + 10, moe_gemm_mode::automatic, 0, 4.f);   // a loose limit: none
  equal_fp32(expert_choice{2.f}, false, seed + 11);                                // c = 75 tokens per expert
  equal_fp32(expert_choice{0.5f}, true, seed + 12, moe_gemm_mode::grouped, 1);     // some tokens get no expert
  equal_fp32(top_k{2, true}, false, seed + 13, moe_gemm_mode::padded_batched);      // one strided batched GEMM
  equal_fp32(top_k{1, true}, true, seed + 14, moe_gemm_mode::padded_batched, 1, 0.7f);  // with drops and shared
}

TEST_CASE("the CUDA MoE adds into an fp32 residual stream", "[router][moe][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  for (int shared : {0, 1}) {
    auto const c = compare<float>(top_k{2, true}, shared == 1, seed + shared, moe_gemm_mode::automatic, shared, 0.f,
                                  true);
    INFO("shared " << shared << ": relative difference " << c.worst());
    CHECK(c.worst() <= 1e-5);
    CHECK(c.out_untouched);
  }
  // d = 62: rows that are not whole 16-byte vectors take the scalar combine.
  auto const s = compare<float>(top_k{2, true}, false, seed + 3, moe_gemm_mode::automatic, 0, 0.f, true, 62);
  INFO("scalar combine: " << s.worst());
  CHECK(s.worst() <= 1e-5);
  CHECK(s.out_untouched);
  auto const b = compare<__nv_bfloat16>(top_k{8, true}, false, seed + 2, moe_gemm_mode::automatic, 0, 0.f, true);
  INFO("bf16: " << b.worst());
  CHECK(b.worst() <= 1e-2);
  CHECK(b.out_untouched);
}

TEST_CASE("the CUDA MoE rejects a call with neither out nor residual, or both", "[router][moe][cuda]") {
  moe_args<float> g;
  g.tokens = 4; g.d_model = 8; g.d_ff = 8; g.experts = 2;
  float dummy = 0.f;
  g.x = g.w_router = g.w_up = g.w_down = &dummy;
  char ws[64];
  REQUIRE_THROWS_WITH(moe_forward(context<drdiff::cuda>{}, top_k{1, true}, g, ws, sizeof ws),
                      Catch::Contains("out (or residual)"));
  float res = 0.f;
  g.out = &dummy;
  g.residual = &res;
  REQUIRE_THROWS_WITH(moe_forward(context<drdiff::cuda>{}, top_k{1, true}, g, ws, sizeof ws),
                      Catch::Contains("out and residual are both set"));
}

TEST_CASE("the CUDA MoE in bf16 equals the CPU MoE within 1e-2", "[router][moe][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  // Every expert active: routing is continuous, so the whole output is within bf16 error.
  for (bool swiglu : {false, true}) {
    auto const c = compare<__nv_bfloat16>(top_k{8, true}, swiglu, seed + swiglu);
    INFO("top-8 of 8, swiglu " << swiglu << ": " << c.worst());
    CHECK(c.worst() <= 1e-2);
  }
  // Top-2: a token whose second and third experts nearly tie may route differently; the rest agree.
  auto const c = compare<__nv_bfloat16>(top_k{2, true}, false, seed + 2);
  INFO("top-2: " << 100 * c.within(1e-2) << " % of tokens within 1e-2, worst " << c.worst());
  CHECK(c.within(1e-2) >= 0.99);
}
