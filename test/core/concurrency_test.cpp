// Several threads at once: drdiff::attention, router::moe_forward and the model's forward called
// from 4 threads concurrently, each with its own outputs and workspace (and its own model object),
// give results bit-identical to the same calls made one after another (docs/architecture.md,
// "Thread safety").

#include "../support/drdiff_test.hpp"
#include "../support/threads.hpp"

#include <drdiff/cpu/model.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <memory>
#include <random>
#include <thread>
#include <vector>

using namespace drdiff;

namespace {


std::vector<float> normals(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd;
  std::vector<float> v(n);
  for (auto& x : v) x = nd(rng);
  return v;
}

}  // namespace

TEST_CASE("attention from 4 threads at once equals 4 sequential calls, bit for bit", "[core][threads][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::vector<test::problem<float>> probs;
  for (int i = 0; i < 4; ++i) probs.emplace_back(1, 1500, 2, 64, seed + i);
  attn::hsa const policy{};
  std::vector<std::vector<float>> seq(4), seq_lse(4);
  for (int i = 0; i < 4; ++i) {
    auto a = probs[i].args();
    attention(context<cpu>{2}, policy, a);
    seq[i] = probs[i].o;
    seq_lse[i] = probs[i].lse;
  }
  for (auto& p : probs) {
    std::fill(p.o.begin(), p.o.end(), std::nanf(""));
    std::fill(p.lse.begin(), p.lse.end(), std::nanf(""));
  }
  test::four_at_once([&](int i) {
    auto a = probs[i].args();
    std::vector<unsigned char> ws(attention_workspace_bytes(context<cpu>{2}, policy, a));
    attention(context<cpu>{2}, policy, a, ws.data(), ws.size());
  });
  for (int i = 0; i < 4; ++i) {
    CHECK(probs[i].o == seq[i]);
    CHECK(probs[i].lse == seq_lse[i]);
  }
}

TEST_CASE("the routed MoE from 4 threads at once equals 4 sequential calls, bit for bit", "[core][threads][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  int const T = 400, d = 64, f = 96, E = 8;
  auto const wr = normals(std::size_t(E) * d, seed), up = normals(std::size_t(E) * f * d, seed + 1),
             down = normals(std::size_t(E) * d * f, seed + 2), br = normals(E, seed + 3);
  std::vector<std::vector<float>> x, out_seq(4), out_par(4);
  for (int i = 0; i < 4; ++i) x.push_back(normals(std::size_t(T) * d, seed + 10 + i));
  auto run = [&](int i, std::vector<float>& out) {
    out.assign(std::size_t(T) * d, std::nanf(""));
    router::moe_args<float> a;
    a.tokens = T; a.d_model = d; a.d_ff = f; a.experts = E;
    a.x = x[i].data(); a.w_router = wr.data(); a.b_router = br.data(); a.w_up = up.data(); a.w_down = down.data();
    a.out = out.data();
    router::moe_forward(context<cpu>{2}, router::top_k{2, true}, a);
  };
  for (int i = 0; i < 4; ++i) run(i, out_seq[i]);
  test::four_at_once([&](int i) { run(i, out_par[i]); });
  for (int i = 0; i < 4; ++i) CHECK(out_par[i] == out_seq[i]);
}

TEST_CASE("the model forward from 4 threads at once (one model object each) equals sequential calls",
          "[core][threads][model][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  auto cfg = presets::tiny();
  cfg.output = prediction::categorical;
  std::vector<std::unique_ptr<model<cpu, model_config<>>>> models;
  for (int i = 0; i < 4; ++i) {
    models.push_back(std::make_unique<model<cpu, model_config<>>>(cfg));
    models.back()->init_random(seed % 1000);
  }
  int const n = 1200, de = cfg.sizes.embed_dim;  // above 1,024: a sparse HSA tier
  std::vector<std::vector<float>> xt, seq(4), par(4);
  for (int i = 0; i < 4; ++i) xt.push_back(normals(std::size_t(n) * de, seed + 20 + i));
  for (int i = 0; i < 4; ++i) {
    seq[i].resize(xt[i].size());
    models[i]->forward(context<cpu>{2}, xt[i].data(), 0.3 + 0.1 * i, seq[i].data(), 1, n);
  }
  test::four_at_once([&](int i) {
    par[i].assign(xt[i].size(), std::nanf(""));
    models[i]->forward(context<cpu>{2}, xt[i].data(), 0.3 + 0.1 * i, par[i].data(), 1, n);
  });
  for (int i = 0; i < 4; ++i) CHECK(par[i] == seq[i]);
}
