// The CUDA fused update equals the CPU one (fp32 ≤ 1e-6 relative), for every combination of terms
// and with the seeded noise.

#include <drdiff/cpu/solver.hpp>
#include <drdiff/cuda.cuh>

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include <thrust/device_vector.h>

using namespace drdiff;

TEST_CASE("the CUDA solver update equals the CPU update", "[solver][update][cuda]") {
  std::size_t const n = (1 << 20) + 37;
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<float> x(n), m0(n), m1(n), m2(n);
  for (auto* v : {&x, &m0, &m1, &m2})
    for (auto& e : *v) e = nd(rng);
  thrust::device_vector<float> held[4] = {{x.begin(), x.end()}, {m0.begin(), m0.end()}, {m1.begin(), m1.end()},
                                           {m2.begin(), m2.end()}};
  float *dx = thrust::raw_pointer_cast(held[0].data()), *dm0 = thrust::raw_pointer_cast(held[1].data()),
        *dm1 = thrust::raw_pointer_cast(held[2].data()), *dm2 = thrust::raw_pointer_cast(held[3].data());
  solver::gaussian_noise const noise{42};
  solver::step_coefficients const cases[] = {
      {0.9, {0.1, 0, 0}, 0, 1},    {0.8, {0.3, -0.1, 0}, 0, 2}, {0.7, {0.5, -0.4, 0.2}, 0, 3},
      {0.6, {0.2, 0, 0.1}, 0, 3},  {0.5, {0.4, 0, 0}, 0.3, 1}, {0.5, {0.4, -0.2, 0}, 0.2, 2},
      {0.0, {1.0, 0, 0}, 0, 1}};
  int step = 0;
  for (auto const& k : cases) {
    ++step;
    std::vector<float> on_cpu = x;
    solver::update(context<cpu>{}, k, on_cpu.data(), m0.data(), m1.data(), m2.data(), n, noise, step);
    DRDIFF_CUDA_CHECK(cudaMemcpy(dx, x.data(), n * sizeof(float), cudaMemcpyHostToDevice));
    solver::update(context<drdiff::cuda>{}, k, dx, dm0, dm1, dm2, n, noise, step);
    std::vector<float> gpu(n);
    DRDIFF_CUDA_CHECK(cudaMemcpy(gpu.data(), dx, n * sizeof(float), cudaMemcpyDeviceToHost));
    double worst = 0;
    for (std::size_t i = 0; i < n; ++i)
      worst = std::max(worst, std::abs(double(gpu[i]) - on_cpu[i]) / std::max(1.0, std::abs(double(on_cpu[i]))));
    INFO("case a = " << k.a << " b = " << k.b[0] << ", " << k.b[1] << ", " << k.b[2] << " c = " << k.c);
    REQUIRE(worst <= 1e-6);
  }
}
