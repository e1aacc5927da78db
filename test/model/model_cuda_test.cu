// The DrDiff model on the GPU agrees with the CPU model (bf16 tolerance), for the tiny preset, a
// block with HSA above a tier threshold and the dense-FFN path; GPU generation is deterministic and
// its tokens mostly agree with the CPU's.

#include "../support/user_policies.hpp"

#include <drdiff/cpu/model.hpp>
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/model.cuh>
#include <drdiff/model/directory.hpp>
#include <drdiff/model/safetensors.hpp>

#include <sys/stat.h>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include <thrust/copy.h>
#include <thrust/device_vector.h>

using namespace drdiff;
using gpu = drdiff::cuda;

namespace {

/// Runs both models on the same input; returns each token's largest difference relative to the
/// largest output magnitude.
template <class Cfg>
std::vector<double> compare_forward(Cfg const& cfg, int batch, int seq, unsigned seed) {
  model<cpu, Cfg> c(cfg);
  c.init_random(seed);
  for (auto const& s : c.parameters())
    for (auto& v : c.tensor(s.name)) v *= 3;
  model<gpu, Cfg> g(cfg, c.weights());
  int const de = cfg.sizes.embed_dim;
  std::size_t const n = std::size_t(batch) * seq * de;
  std::vector<float> x(n), want(n), got(n, std::nanf(""));
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& e : x) e = nd(rng);
  c.forward(context<cpu>{2}, x.data(), 0.41, want.data(), batch, seq);
  thrust::device_vector<float> dx(x.begin(), x.end()), dy(n);
  model_timing tm;
  g.forward(context<gpu>{}, thrust::raw_pointer_cast(dx.data()), 0.41, thrust::raw_pointer_cast(dy.data()), batch, seq,
            &tm);
  thrust::copy(dy.begin(), dy.end(), got.begin());
  CHECK(tm.attention > 0);
  CHECK(tm.moe > 0);
  double mag = 0;
  for (float w : want) mag = std::max(mag, double(std::abs(w)));
  std::vector<double> err(std::size_t(batch) * seq, 0.0);
  for (std::size_t i = 0; i < n; ++i)
    err[i / de] = std::max(err[i / de], std::isfinite(got[i]) ? std::abs(got[i] - want[i]) / mag : INFINITY);
  return err;
}

double worst(std::vector<double> const& e) { return *std::max_element(e.begin(), e.end()); }
/// The share of tokens within `tol`.
double within(std::vector<double> const& e, double tol) {
  return double(std::count_if(e.begin(), e.end(), [&](double v) { return v <= tol; })) / double(e.size());
}

}  // namespace

TEST_CASE("GPU model forward equals the CPU model (bf16 tolerance)", "[model][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  // Every expert active (routing is continuous in the input): the whole output within bf16 error.
  model_config<> all = presets::tiny();
  all.router.k = all.sizes.experts;
  double const e1 = worst(compare_forward(all, 2, 77, seed));
  INFO("tiny, top-4 of 4: " << e1);
  CHECK(e1 <= 3e-2);
  auto hsa = all;
  hsa.sizes.blocks = 1;
  hsa.attention = test::small_tiers();
  double const e2 = worst(compare_forward(hsa, 1, 700, seed + 1));
  INFO("HSA above a tier threshold: " << e2);
  CHECK(e2 <= 3e-2);
  auto dense = presets::tiny();
  dense.sizes.experts = 1;
  dense.router.k = 1;
  double const e3 = worst(compare_forward(dense, 1, 100, seed + 2));
  INFO("dense FFN: " << e3);
  CHECK(e3 <= 3e-2);
  auto shared = all;
  shared.sizes.shared_experts = 1;
  shared.activation = ffn_activation::swiglu;
  double const e5 = worst(compare_forward(shared, 1, 90, seed + 4));
  INFO("SwiGLU with a shared expert: " << e5);
  CHECK(e5 <= 3e-2);
  // The categorical prediction: with these random weights (× 3) the logits z·Eᵀ span tens of units,
  // so a token whose top logits nearly tie amplifies z's bf16 error (measured on the H200: worst token
  // 0.10 of the output scale); the others agree. The trained checkpoint agrees to 0.4 % (below).
  auto cat = all;
  cat.output = prediction::categorical;
  auto const e6 = compare_forward(cat, 1, 300, seed + 5);
  INFO("categorical data prediction: " << 100 * within(e6, 3e-2) << " % of tokens within 3e-2, worst " << worst(e6));
  CHECK(within(e6, 3e-2) >= 0.9);
  // Top-2 of 4: a token whose second and third expert nearly tie may route differently in bf16 and
  // fp32; the others agree.
  auto const e4 = compare_forward(presets::tiny(), 2, 300, seed + 3);
  INFO("tiny, top-2: " << 100 * within(e4, 3e-2) << " % of tokens within 3e-2");
  CHECK(within(e4, 3e-2) >= 0.9);
}

TEST_CASE("GPU generation is deterministic and agrees with the CPU on most tokens", "[model][cuda]") {
  auto cfg = presets::tiny();
  model<cpu, model_config<>> c(cfg);
  c.init_random(9);
  for (auto const& s : c.parameters())
    for (auto& v : c.tensor(s.name)) v *= 3;
  model<gpu, model_config<>> g(cfg, c.weights());
  generation_request r;
  r.prompt = {68, 114, 68, 105, 102, 102};
  r.length = 200;
  r.seed = 4;
  auto const a = g.generate(context<gpu>{}, r);
  r.time_components = true;
  auto const b = g.generate(context<gpu>{}, r);
  r.time_components = false;
  CHECK(a.tokens == b.tokens);
  CHECK(b.timing.attention > 0);
  auto const h = c.generate(context<cpu>{2}, r);
  int same = 0;
  for (std::size_t i = 0; i < h.tokens.size(); ++i) same += h.tokens[i] == a.tokens[i];
  double const agree = double(same) / double(h.tokens.size());
  WARN("GPU (bf16) and CPU (fp32) generated tokens agree on " << 100 * agree << " %");
  CHECK(agree >= 0.8);
  r.seed = 5;
  CHECK(g.generate(context<gpu>{}, r).tokens != a.tokens);
}

TEST_CASE("the shipped checkpoint's GPU forward matches PyTorch's golden tensors (bf16 tolerance)", "[model][cuda]") {
  std::string const root = DRDIFF_SOURCE_DIR;
  std::string const golden = root + "/test/model/golden/forward.safetensors";
  struct stat st {};
  REQUIRE(::stat(golden.c_str(), &st) == 0);
  auto const dir = model_directory::open(root + "/models/drdiff-text");
  model<cpu, model_config<>> c(dir.config);
  dir.load_into(c);
  model<gpu, model_config<>> g(dir.config, c.weights());
  auto const f = safetensors::file::open(golden);
  for (auto const& t : f.tensors()) {
    if (t.name.rfind("xt.", 0) != 0) continue;
    std::string const tag = t.name.substr(3);
    int const n = int(t.shape[0]), de = int(t.shape[1]);
    std::size_t const sz = std::size_t(n) * de;
    std::vector<float> xt(sz), ref(sz), tv(1), got(sz);
    f.read("xt." + tag, {n, de}, xt.data());
    f.read("x0." + tag, {n, de}, ref.data());
    f.read("t." + tag, {1}, tv.data());
    thrust::device_vector<float> dx(xt.begin(), xt.begin() + std::ptrdiff_t(sz)), dy(sz);
    g.forward(context<gpu>{}, thrust::raw_pointer_cast(dx.data()), double(tv[0]), thrust::raw_pointer_cast(dy.data()),
              1, n);
    thrust::copy(dy.begin(), dy.end(), got.begin());
    double num = 0, den = 0;
    for (std::size_t i = 0; i < sz; ++i) {
      num += double(got[i] - ref[i]) * (got[i] - ref[i]);
      den += double(ref[i]) * ref[i];
    }
    double const rel = std::sqrt(num / den);
    INFO(tag << ": N = " << n << ", relative L2 difference " << rel);
    WARN("shipped checkpoint, GPU vs PyTorch fp32, " << tag << ": relative L2 " << rel);
    CHECK(rel < 5e-2);
  }
}
