// The GPU MoE equals the CPU MoE (fp32, ≤ 1e-5 relative) for several routers and both activations.

#include <drdiff/cpu/moe.hpp>
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/moe.cuh>

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

using namespace drdiff;
using namespace drdiff::router;

namespace {

template <class R>
void compare(R const& r, bool swiglu, unsigned seed, moe_gemm_mode mode = moe_gemm_mode::automatic) {
  int const T = 300, d = 64, f = 128, E = 8;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto make = [&](std::size_t n, float s) {
    std::vector<float> v(n);
    for (auto& e : v) e = s * nd(rng);
    return v;
  };
  auto x = make(std::size_t(T) * d, 1.f), wr = make(std::size_t(E) * d, 0.125f), br = make(E, 0.1f);
  auto up = make(std::size_t(E) * f * d, 0.125f), gate = make(std::size_t(E) * f * d, 0.125f);
  auto down = make(std::size_t(E) * d * f, 0.09f);
  std::vector<float> out_cpu(std::size_t(T) * d);
  moe_args a;
  a.tokens = T; a.d_model = d; a.d_ff = f; a.experts = E;
  a.x = x.data(); a.w_router = wr.data(); a.b_router = br.data(); a.w_up = up.data(); a.w_gate = gate.data();
  a.w_down = down.data(); a.out = out_cpu.data();
  a.act = swiglu ? activation::swiglu : activation::gelu;
  moe_stats st;
  moe_forward(context<cpu>{}, r, a, &st);

  auto dev = [](std::vector<float> const& h) {
    float* p = nullptr;
    DRDIFF_CUDA_CHECK(cudaMalloc(&p, h.size() * sizeof(float)));
    DRDIFF_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(float), cudaMemcpyHostToDevice));
    return p;
  };
  float *dx = dev(x), *dwr = dev(wr), *dbr = dev(br), *dup = dev(up), *dgate = dev(gate), *ddown = dev(down);
  float* dout = dev(std::vector<float>(std::size_t(T) * d, std::nanf("")));
  cublasHandle_t handle;
  REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
  cuda_moe_args<float> g;
  g.tokens = T; g.d_model = d; g.d_ff = f; g.experts = E;
  g.x = dx; g.w_router = dwr; g.b_router = dbr; g.w_up = dup; g.w_gate = dgate; g.w_down = ddown; g.out = dout;
  g.act = swiglu ? cuda_activation::swiglu : cuda_activation::gelu;
  g.cublas = handle;
  g.gemm_mode = mode;
  std::size_t const bytes = moe_workspace_bytes(r, g);
  void* ws = nullptr;
  DRDIFF_CUDA_CHECK(cudaMalloc(&ws, bytes));
  std::vector<int> per_expert;
  moe_forward(context<drdiff::cuda>{}, r, g, ws, bytes, &per_expert);  // ::cuda (libcu++) is visible too
  std::vector<float> out_gpu(std::size_t(T) * d);
  DRDIFF_CUDA_CHECK(cudaMemcpy(out_gpu.data(), dout, out_gpu.size() * sizeof(float), cudaMemcpyDeviceToHost));
  double diff = 0, mag = 0;
  for (std::size_t i = 0; i < out_gpu.size(); ++i) {
    REQUIRE(std::isfinite(out_gpu[i]));
    diff = std::max(diff, double(std::abs(out_gpu[i] - out_cpu[i])));
    mag = std::max(mag, double(std::abs(out_cpu[i])));
  }
  INFO("relative difference " << diff / mag);
  REQUIRE(diff / mag <= 1e-5);
  REQUIRE(per_expert == st.tokens_per_expert);
  cublasDestroy(handle);
  for (float* p : {dx, dwr, dbr, dup, dgate, ddown, dout}) cudaFree(p);
  cudaFree(ws);
}

}  // namespace

TEST_CASE("the CUDA MoE equals the CPU MoE", "[router][moe][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  compare(top_k{2, true}, false, seed);
  compare(top_k{1, false}, true, seed + 1);
  compare(top_p{0.5f, 1, 4, false}, false, seed + 2);
  compare(adaptive<entropy_score>{1, 4}, true, seed + 3);
  compare(top_k{2, true}, true, seed + 4, moe_gemm_mode::grouped);     // one grouped GEMM per projection
  compare(top_k{2, true}, false, seed + 5, moe_gemm_mode::per_expert);  // one GEMM per expert
}
