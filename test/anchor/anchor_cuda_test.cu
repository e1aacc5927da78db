// Semantic anchor states on the GPU equal the CPU: absorbing noise (the same counter-based numbers),
// rounding (fp32 and bf16), segment pooling, the linear projector, guidance and re-anchoring inside
// the GPU sampling loop, and the loop's NaN report.

#include <drdiff/cpu/anchor.hpp>
#include <drdiff/cpu/solver.hpp>
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/anchor.cuh>

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

#include <thrust/copy.h>
#include <thrust/device_vector.h>

using namespace drdiff;
using Catch::Matchers::Contains;
using gpu = drdiff::cuda;  // ::cuda (libcu++) is visible too

namespace {

template <class T>
std::vector<T> randn(std::size_t n, unsigned seed, double scale = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<T> v(n);
  for (auto& e : v) e = T(nd(rng));
  return v;
}

template <class T>
struct dev {
  thrust::device_vector<T> v;  // the memory, owned by Thrust
  T* p = nullptr;
  std::size_t n = 0;
  explicit dev(std::size_t count) : v(std::max<std::size_t>(count, 1)), p(thrust::raw_pointer_cast(v.data())), n(count) {}
  explicit dev(std::vector<T> const& h) : dev(h.size()) { thrust::copy(h.begin(), h.end(), v.begin()); }
  dev(dev const&) = delete;
  std::vector<T> host() const {
    std::vector<T> h(n);
    thrust::copy(v.begin(), v.begin() + std::ptrdiff_t(n), h.begin());
    return h;
  }
};

double max_rel(std::vector<float> const& a, std::vector<float> const& b) {
  double diff = 0, mag = 1e-30;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    diff = std::max(diff, double(std::abs(a[i] - b[i])));
    mag = std::max(mag, double(std::abs(b[i])));
  }
  return diff / mag;
}

struct blas_handle {
  cublasHandle_t h = nullptr;
  blas_handle() { REQUIRE(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS); }
  ~blas_handle() { cublasDestroy(h); }
};
/// A GPU context carrying the test's cuBLAS handle.
context<gpu> on(blas_handle const& b) {
  context<gpu> c;
  c.cublas = b.h;
  return c;
}

}  // namespace

TEST_CASE("absorb on the GPU draws the CPU's numbers", "[anchor][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  int const B = 300, N = 40, d = 24;  // B > 256: two launches
  auto x0 = randn<float>(std::size_t(B) * N * d, seed);
  auto m = randn<float>(d, seed + 1, 0.3);
  std::vector<unsigned char> target(std::size_t(B) * N);
  for (std::size_t i = 0; i < target.size(); ++i) target[i] = (i % N) >= 5;
  std::vector<double> ab(B);
  for (int b = 0; b < B; ++b) ab[b] = double(b) / (B - 1);
  anchor::soft_absorbing const s{0.4, seed};
  std::vector<float> cpu_out(x0.size());
  anchor::absorb_args<float> a;
  a.shape = {B, N, d};
  a.x0 = x0.data(); a.maybe_m = m.data(); a.alpha_bar = ab.data(); a.maybe_target = target.data();
  a.xt = cpu_out.data(); a.stream = 3;
  anchor::absorb(context<cpu>{2}, s, a);
  dev<float> dx0(x0), dm(m), dout(x0.size());
  dev<unsigned char> dt(target);
  auto g = a;
  g.x0 = dx0.p; g.maybe_m = dm.p; g.maybe_target = dt.p; g.xt = dout.p;
  anchor::absorb(context<gpu>{}, s, g);
  auto const got = dout.host();
  REQUIRE(max_rel(got, cpu_out) <= 1e-6);
}

TEST_CASE("round_to_nearest on the GPU equals the CPU (fp32; bf16 within its rounding)", "[anchor][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  blas_handle blas;
  for (auto metric : {anchor::metric::l2, anchor::metric::dot}) {
    int const V = 3000, d = 64, B = 2, N = 2500;  // 5000 tokens: three score chunks
    anchor::token_shape const sh{B, N, d};
    auto table = randn<float>(std::size_t(V) * d, seed);
    auto x = randn<float>(std::size_t(B) * N * d, seed + 1, 1.2);
    std::vector<int> ids_cpu(sh.tokens());
    std::vector<float> out_cpu(x.size());
    anchor::nearest_embedding<float> p{table.data(), V, d, metric};
    anchor::round_to_nearest(context<cpu>{2}, p, sh, x.data(), ids_cpu.data(), out_cpu.data());

    dev<float> dtab(table), dx(x), dout(x.size());
    dev<int> dids(ids_cpu.size());
    anchor::nearest_embedding<float> pg{dtab.p, V, d, metric};
    std::size_t const bytes = anchor::workspace_bytes(context<gpu>{}, pg, sh);
    dev<char> ws(bytes);
    anchor::round_to_nearest(on(blas), pg, sh, static_cast<float const*>(dx.p), dids.p, dout.p, ws.p,
                             bytes);
    auto const ids = dids.host();
    auto const out = dout.host();
    auto score = [&](int t, int v) {
      double s = 0, n = 0;
      for (int k = 0; k < d; ++k) {
        s += double(x[std::size_t(t) * d + k]) * table[std::size_t(v) * d + k];
        n += double(table[std::size_t(v) * d + k]) * table[std::size_t(v) * d + k];
      }
      return metric == anchor::metric::l2 ? s - 0.5 * n : s;
    };
    int differ = 0;
    for (int t = 0; t < int(sh.tokens()); ++t) {
      if (ids[t] == ids_cpu[t]) continue;
      ++differ;
      REQUIRE(std::abs(score(t, ids[t]) - score(t, ids_cpu[t])) <= 1e-4 * (1 + std::abs(score(t, ids_cpu[t]))));
    }
    CHECK(differ <= 2);
    for (int t = 0; t < int(sh.tokens()); ++t)
      for (int k = 0; k < d; ++k) REQUIRE(out[std::size_t(t) * d + k] == table[std::size_t(ids[t]) * d + k]);

    // bf16: the CPU runs on the same bf16-rounded values.
    std::vector<__nv_bfloat16> tb(table.size()), xb(x.size());
    std::vector<float> tr(table.size()), xr(x.size());
    for (std::size_t i = 0; i < table.size(); ++i) tr[i] = __bfloat162float(tb[i] = __float2bfloat16(table[i]));
    for (std::size_t i = 0; i < x.size(); ++i) xr[i] = __bfloat162float(xb[i] = __float2bfloat16(x[i]));
    anchor::nearest_embedding<float> pr{tr.data(), V, d, metric};
    anchor::round_to_nearest(context<cpu>{2}, pr, sh, xr.data(), ids_cpu.data());
    dev<__nv_bfloat16> dtb(tb), dxb(xb);
    anchor::nearest_embedding<__nv_bfloat16> pb{dtb.p, V, d, metric};
    anchor::round_to_nearest(on(blas), pb, sh, static_cast<__nv_bfloat16 const*>(dxb.p), dids.p,
                             static_cast<__nv_bfloat16*>(nullptr), ws.p, bytes);
    auto const idb = dids.host();
    differ = 0;
    for (int t = 0; t < int(sh.tokens()); ++t) differ += idb[t] != ids_cpu[t];
    CHECK(differ <= 2);
  }
}

TEST_CASE("segment_pool and linear on the GPU equal the CPU", "[anchor][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  blas_handle blas;
  int const B = 3, N = 1001, d = 96, L = 64, r = 8;
  anchor::token_shape const sh{B, N, d};
  auto x = randn<float>(std::size_t(B) * N * d, seed);
  auto down = randn<float>(std::size_t(r) * d, seed + 1, 0.2), up = randn<float>(std::size_t(d) * r, seed + 2, 0.2);
  auto W = randn<float>(std::size_t(d) * d, seed + 3, 0.1), bias = randn<float>(d, seed + 4);
  dev<float> dx(x), ddown(down), dup(up), dW(W), dbias(bias), dout(x.size());
  std::vector<float> want(x.size());
  for (int rank : {0, r}) {
    anchor::segment_pool<float> p{L, rank, rank ? down.data() : nullptr, rank ? up.data() : nullptr};
    anchor::project(context<cpu>{2}, p, sh, x.data(), want.data());
    anchor::segment_pool<float> pg{L, rank, rank ? ddown.p : nullptr, rank ? dup.p : nullptr};
    std::size_t const bytes = anchor::projector_workspace_bytes(context<gpu>{}, pg, sh);
    dev<char> ws(bytes);
    anchor::project(on(blas), pg, sh, static_cast<float const*>(dx.p), dout.p, ws.p, bytes);
    REQUIRE(max_rel(dout.host(), want) <= 1e-5);
  }
  anchor::linear<float> lc{W.data(), bias.data(), d}, lg{dW.p, dbias.p, d};
  anchor::project(context<cpu>{2}, lc, sh, x.data(), want.data());
  anchor::project(on(blas), lg, sh, static_cast<float const*>(dx.p), dout.p);
  REQUIRE(max_rel(dout.host(), want) <= 1e-5);
}

TEST_CASE("GPU sampling loop with clamp guidance and re-anchoring equals the CPU loop", "[anchor][solver][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  blas_handle blas;
  int const V = 40, d = 16, N = 512;
  anchor::token_shape const sh{1, N, d};
  std::size_t const n = std::size_t(N) * d;
  auto table = randn<float>(std::size_t(V) * d, seed);
  auto x_init = randn<float>(n, seed + 1);
  std::vector<unsigned char> target(N, 1);
  for (int i = 0; i < 32; ++i) target[i] = 0;
  std::vector<float> clean(n);
  for (int i = 0; i < N; ++i)
    for (int k = 0; k < d; ++k) clean[std::size_t(i) * d + k] = table[std::size_t(i % V) * d + k];
  solver::schedule_ops<solver::vp_linear> ops{};
  auto const grid = solver::make_grid(ops, 12, solver::spacing::uniform_lambda, 1.0, 1e-3);
  anchor::guidance_schedule sch;
  sch.lambda_min = -1.0;
  sch.lambda_max = 3.0;
  sch.gamma_start = 0.2;
  sch.gamma_end = 0.9;
  // The model: x̂0 = 0.6·x (a simple linear denoiser on both backends).
  auto cpu_model = [&](float const* x, double, float* out) {
    for (std::size_t i = 0; i < n; ++i) out[i] = 0.6f * x[i];
  };
  std::vector<float> xc = x_init, ws(3 * n), scratch(n);
  anchor::nearest_embedding<float> pc{table.data(), V, d};
  auto gc = anchor::make_guidance(context<cpu>{2}, sh, anchor::bind<float>(context<cpu>{2}, pc, sh), sch, ops,
                                  scratch.data());
  anchor::keep_clean<cpu, float> kc(context<cpu>{2}, sh, target.data(), clean.data());
  solver::dpmpp_sample(context<cpu>{2}, ops, solver::dpmpp_config{}, grid, cpu_model, xc.data(), n, ws.data(),
                       anchor::chain(std::ref(gc), kc), kc);

  dev<float> dtab(table), dx(x_init), dclean(clean), dws(solver::sample_workspace_size<float>(n)), dscr(n);
  dev<unsigned char> dtarget(target);
  anchor::nearest_embedding<float> pg{dtab.p, V, d};
  std::size_t const pbytes = anchor::projector_workspace_bytes(context<gpu>{}, pg, sh);
  dev<char> pws(pbytes);
  auto gg = anchor::make_guidance(context<gpu>{}, sh, anchor::bind<float>(on(blas), pg, sh, pws.p, pbytes),
                                  sch, ops, dscr.p);
  anchor::keep_clean<gpu, float> kg(context<gpu>{}, sh, dtarget.p, dclean.p);
  auto gpu_model = [&](float const* x, double, float* out) {
    solver::step_coefficients k;  // out = 0.6·x through the update kernel: out ← 0·out + 0.6·x
    k.a = 0.0;
    k.b[0] = 0.6;
    DRDIFF_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(float) * n));
    solver::update(context<gpu>{}, k, out, x, x, x, n);
  };
  solver::dpmpp_sample(context<gpu>{}, ops, solver::dpmpp_config{}, grid, gpu_model, dx.p, n, dws.p,
                       anchor::chain(std::ref(gg), kg), kg);
  CHECK(gg.applied() == gc.applied());
  CHECK(gc.applied() > 3);
  REQUIRE(max_rel(dx.host(), xc) <= 1e-5);

  // A NaN from the model is reported with its step.
  auto nan_model = [&](float const* x, double t, float* out) {
    gpu_model(x, t, out);
    if (t < 0.5) DRDIFF_CUDA_CHECK(cudaMemset(out + 7, 0xff, sizeof(float)));
  };
  REQUIRE_THROWS_WITH(solver::dpmpp_sample(context<gpu>{}, ops, solver::dpmpp_config{}, grid, nan_model, dx.p, n, dws.p),
                      Contains("first at step"));
}

TEST_CASE("anchor bad input on the GPU", "[anchor][cuda][errors]") {
  blas_handle blas;
  anchor::token_shape const sh{1, 8, 8};
  dev<float> x(64), table(64);
  dev<int> ids(8);
  anchor::nearest_embedding<float> p{table.p, 8, 8};
  dev<char> small(16);
  REQUIRE_THROWS_WITH(anchor::round_to_nearest(on(blas), p, sh, static_cast<float const*>(x.p), ids.p,
                                               static_cast<float*>(nullptr), small.p, 16),
                      Contains("workspace of 16 bytes"));
  anchor::segment_pool<float> sp{4};
  REQUIRE_THROWS_WITH(anchor::project(on(blas), sp, sh, static_cast<float const*>(x.p), table.p,
                                      static_cast<void*>(nullptr), 0),
                      Contains("segment_pool: workspace"));
  std::vector<float> nan(64, std::nanf(""));
  dev<float> dn(nan);
  std::size_t const bytes = anchor::workspace_bytes(context<gpu>{}, p, sh);
  dev<char> ws(bytes);
  REQUIRE_THROWS_WITH(anchor::round_to_nearest(on(blas), p, sh, static_cast<float const*>(dn.p), ids.p,
                                               static_cast<float*>(nullptr), ws.p, bytes),
                      Contains("no finite score"));
}
