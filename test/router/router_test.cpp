// Routers against plain per-token loops; the routed MoE against a per-token loop over the selected
// experts; dispatch is a permutation; statistics match their formulas; bad input is rejected.

#include <drdiff/cpu/moe.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#include "../support/drdiff_test.hpp"

using namespace drdiff;
using namespace drdiff::router;
using Catch::Matchers::Contains;

namespace {

std::vector<double> softmax_ref(std::vector<float> const& z) {
  double mx = *std::max_element(z.begin(), z.end()), s = 0;
  std::vector<double> p(z.size());
  for (std::size_t i = 0; i < z.size(); ++i) s += (p[i] = std::exp(double(z[i]) - mx));
  for (auto& v : p) v /= s;
  return p;
}
std::vector<int> order_desc(std::vector<double> const& p) {
  std::vector<int> idx(p.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
  return idx;
}

/// The k most probable experts and their weights (renormalised over the k, or raw).
std::pair<std::vector<int>, std::vector<double>> ref_top(std::vector<float> const& z, int k, bool renormalize) {
  auto const p = softmax_ref(z);
  auto const o = order_desc(p);
  std::vector<int> ex(o.begin(), o.begin() + k);
  double s = 0;
  for (int e : ex) s += p[e];
  std::vector<double> w;
  for (int e : ex) w.push_back(renormalize ? p[e] / s : p[e]);
  return {ex, w};
}

template <class R>
void check_router(R const& r, int E, std::mt19937_64& rng,
                  std::function<std::pair<std::vector<int>, std::vector<double>>(std::vector<float> const&)> const& ref) {
  std::normal_distribution<float> nd(0.f, 2.f);
  for (int it = 0; it < 300; ++it) {
    std::vector<float> z(E);
    for (auto& v : z) v = nd(rng);
    std::vector<int> ex(r.max_selected(E));
    std::vector<float> w(r.max_selected(E));
    int const n = r(z.data(), E, token_info{}, ex.data(), w.data());
    auto const [rex, rw] = ref(z);
    REQUIRE(n == int(rex.size()));
    for (int j = 0; j < n; ++j) {
      REQUIRE(ex[j] == rex[j]);
      REQUIRE(w[j] == Approx(rw[j]).epsilon(1e-5));
    }
  }
}

}  // namespace

TEST_CASE("routers select and weight like plain per-token loops", "[router][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int E : {1, 2, 8, 16, 64}) {
    INFO("E = " << E);
    int const k = std::min(2, E);
    check_router(top_k{k, true}, E, rng, [&](std::vector<float> const& z) { return ref_top(z, k, true); });
    check_router(top_k{k, false}, E, rng, [&](std::vector<float> const& z) { return ref_top(z, k, false); });
    top_p const tp{0.6f, 1, std::min(4, E), false};
    check_router(tp, E, rng, [&](std::vector<float> const& z) {
      auto const p = softmax_ref(z);
      auto const o = order_desc(p);
      std::vector<int> ex;
      std::vector<double> w;
      double cum = 0;
      for (int e : o) {
        if (int(ex.size()) >= tp.k_max || (int(ex.size()) >= tp.k_min && cum >= tp.p)) break;
        ex.push_back(e);
        w.push_back(p[e]);
        cum += p[e];
      }
      return std::pair{ex, w};
    });
    adaptive<entropy_score> const ad{1, std::min(4, E)};
    check_router(ad, E, rng, [&](std::vector<float> const& z) {
      auto const p = softmax_ref(z);
      double h = 0;
      for (double v : p) h -= v > 0 ? v * std::log(v) : 0;
      double const c = E > 1 ? h / std::log(double(E)) : 0;
      int const k2 = std::clamp(ad.k_min + int(std::floor(c * (ad.k_max - ad.k_min) + 0.5)), ad.k_min, ad.k_max);
      return ref_top(z, k2, true);
    });
  }
}

TEST_CASE("adaptive routing spends more experts on flat (uncertain) router distributions", "[router][cpu]") {
  adaptive<entropy_score> const ad{1, 4};
  std::vector<float> flat(8, 0.f), peaked(8, 0.f);
  peaked[3] = 12.f;
  int ex[4];
  float w[4];
  REQUIRE(ad(flat.data(), 8, token_info{}, ex, w) == 4);
  REQUIRE(ad(peaked.data(), 8, token_info{}, ex, w) == 1);
  REQUIRE(ex[0] == 3);
  adaptive<timestep_score> const by_t{1, 3};
  token_info noisy, clean;
  noisy.timestep = 1.f;
  clean.timestep = 0.f;
  REQUIRE(by_t(flat.data(), 8, noisy, ex, w) == 3);
  REQUIRE(by_t(flat.data(), 8, clean, ex, w) == 1);
}

TEST_CASE("a selection bias moves the choice but not the weights' source", "[router][cpu]") {
  std::vector<float> z = {2.f, 1.f, 0.f, -1.f};
  std::vector<float> bias = {0.f, 0.f, 5.f, 0.f};
  biased<top_k> const b{top_k{2, true}, bias.data()};
  int ex[2];
  float w[2];
  REQUIRE(b(z.data(), 4, token_info{}, ex, w) == 2);
  REQUIRE(ex[0] == 2);  // 0 + 5 is the largest biased logit
  REQUIRE(ex[1] == 0);
  // Weights: unbiased softmax over {2, 0}: e^0 / (e^0 + e^2) and e^2 / (...)
  double const p2 = std::exp(0.0) / (std::exp(0.0) + std::exp(2.0));
  REQUIRE(w[0] == Approx(p2).epsilon(1e-6));
  REQUIRE(w[1] == Approx(1 - p2).epsilon(1e-6));
}

namespace {
struct moe_problem {
  int T, d, f, E;
  std::vector<float> x, wr, br, up, gate, down, out, s_up, s_gate, s_down;
  int shared = 0;
  moe_problem(int t, int dm, int ff, int e, std::uint64_t seed) : T(t), d(dm), f(ff), E(e) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    auto fill = [&](std::vector<float>& v, std::size_t n, float s) {
      v.resize(n);
      for (auto& e2 : v) e2 = s * nd(rng);
    };
    fill(x, std::size_t(T) * d, 1.f);
    fill(wr, std::size_t(E) * d, 1.f / std::sqrt(float(d)));
    fill(br, E, 0.1f);
    fill(up, std::size_t(E) * f * d, 1.f / std::sqrt(float(d)));
    fill(gate, std::size_t(E) * f * d, 1.f / std::sqrt(float(d)));
    fill(down, std::size_t(E) * d * f, 1.f / std::sqrt(float(f)));
    fill(s_up, std::size_t(2) * f * d, 1.f / std::sqrt(float(d)));
    fill(s_gate, std::size_t(2) * f * d, 1.f / std::sqrt(float(d)));
    fill(s_down, std::size_t(2) * d * f, 1.f / std::sqrt(float(f)));
    out.assign(std::size_t(T) * d, std::nanf(""));
  }
  moe_args<float> args(activation act) {
    moe_args<float> a;
    a.tokens = T; a.d_model = d; a.d_ff = f; a.experts = E;
    a.x = x.data(); a.w_router = wr.data(); a.b_router = br.data();
    a.w_up = up.data(); a.w_gate = gate.data(); a.w_down = down.data(); a.out = out.data();
    a.act = act;
    a.shared_experts = shared;
    a.w_shared_up = s_up.data(); a.w_shared_gate = s_gate.data(); a.w_shared_down = s_down.data();
    return a;
  }
  /// Router logits of token t (double accumulation, rounded to float like the layer's).
  std::vector<float> logits(int t) const {
    std::vector<float> z(E);
    for (int e = 0; e < E; ++e) {
      double s = br[e];
      for (int k = 0; k < d; ++k) s += double(x[std::size_t(t) * d + k]) * wr[std::size_t(e) * d + k];
      z[e] = float(s);
    }
    return z;
  }
  /// FFN of expert rows (up, gate, down) on token t, in double.
  std::vector<double> ffn(float const* u, float const* g, float const* dn, int t, activation act) const {
    std::vector<double> h(f), y(d, 0.0);
    for (int i = 0; i < f; ++i) {
      double uu = 0, gg = 0;
      for (int k = 0; k < d; ++k) {
        uu += double(x[std::size_t(t) * d + k]) * u[std::size_t(i) * d + k];
        gg += double(x[std::size_t(t) * d + k]) * g[std::size_t(i) * d + k];
      }
      h[i] = act == activation::gelu ? 0.5 * uu * (1 + std::erf(uu / std::sqrt(2.0))) : uu * gg / (1 + std::exp(-gg));
    }
    for (int k = 0; k < d; ++k)
      for (int i = 0; i < f; ++i) y[k] += h[i] * dn[std::size_t(k) * f + i];
    return y;
  }
  /// out[t] by a per-token loop in double over the router's own selection (minus the selections
  /// `keep` rejects), plus the shared experts.
  template <class R>
  std::vector<double> reference(R const& r, activation act,
                                std::function<bool(int, int)> const& keep = [](int, int) { return true; }) const {
    std::vector<double> o(std::size_t(T) * d, 0.0);
    for (int t = 0; t < T; ++t) {
      std::vector<float> const z = logits(t);
      std::vector<int> ex(r.max_selected(E));
      std::vector<float> w(r.max_selected(E));
      int const n = r(z.data(), E, token_info{}, ex.data(), w.data());
      for (int j = 0; j < n; ++j) {
        if (!keep(t, j)) continue;
        std::size_t const off = std::size_t(ex[j]) * f * d;
        auto const y = ffn(up.data() + off, gate.data() + off, down.data() + off, t, act);
        for (int k = 0; k < d; ++k) o[std::size_t(t) * d + k] += w[j] * y[k];
      }
      for (int sh = 0; sh < shared; ++sh) {
        std::size_t const off = std::size_t(sh) * f * d;
        auto const y = ffn(s_up.data() + off, s_gate.data() + off, s_down.data() + off, t, act);
        for (int k = 0; k < d; ++k) o[std::size_t(t) * d + k] += y[k];
      }
    }
    return o;
  }
};

double rel_diff(std::vector<float> const& out, std::vector<double> const& ref) {
  double diff = 0, mag = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(out[i])) return INFINITY;
    diff = std::max(diff, std::abs(out[i] - ref[i]));
    mag = std::max(mag, std::abs(ref[i]));
  }
  return diff / mag;
}

template <class R>
void check_moe(R const& r, activation act, std::uint64_t seed, int shared = 0) {
  moe_problem p(97, 32, 64, 8, seed);
  p.shared = shared;
  moe_stats st;
  auto a = p.args(act);
  a.maybe_stats = &st;
  moe_forward(context<cpu>{2}, r, a);
  double const err = rel_diff(p.out, p.reference(r, act));
  INFO("relative error " << err);
  REQUIRE(err <= 1e-5);
}
}  // namespace

TEST_CASE("the routed MoE equals a per-token loop over the selected experts", "[router][moe][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  check_moe(top_k{2, true}, activation::gelu, seed);
  check_moe(top_k{1, false}, activation::swiglu, seed + 1);
  check_moe(top_p{0.5f, 1, 4, false}, activation::gelu, seed + 2);
  check_moe(adaptive<entropy_score>{1, 4}, activation::swiglu, seed + 3);
  check_moe(top_k{2, true}, activation::swiglu, seed + 4, /*shared=*/2);  // shared experts always on
}

TEST_CASE("the MoE adds its output to an fp32 residual stream instead of writing out", "[router][moe][cpu]") {
  moe_problem p(97, 32, 64, 8, test::fresh_seed());
  moe_forward(context<cpu>{2}, top_k{2, true}, p.args(activation::gelu));
  std::vector<float> const out = p.out;
  std::vector<float> res(out.size());
  for (std::size_t i = 0; i < res.size(); ++i) res[i] = float(i % 7) - 3.f;
  std::vector<float> const base = res;
  auto a = p.args(activation::gelu);
  a.out = nullptr;
  a.residual = res.data();
  moe_forward(context<cpu>{2}, top_k{2, true}, a);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < res.size(); ++i) mismatches += res[i] != base[i] + out[i];  // the same sum, one add
  REQUIRE(mismatches == 0);
  a.out = p.out.data();
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{2, true}, a), Contains("out and residual are both set"));
}

TEST_CASE("a capacity limit drops the selections past it, in token order", "[router][moe][cpu]") {
  moe_problem p(120, 16, 32, 4, test::fresh_seed());
  top_k const r{2, true};
  auto a = p.args(activation::gelu);
  a.capacity_factor = 0.5f;  // ⌈0.5·120·2/4⌉ = 30 rows per expert
  moe_stats st;
  auto const rt = route(context<cpu>{2}, r, a, &st);
  // The expected drops, replayed from a dropless routing in token order.
  auto b = a;
  b.capacity_factor = 0.f;
  auto const full = route(context<cpu>{1}, r, b);
  std::vector<int> used(p.E, 0);
  std::vector<char> keep(std::size_t(p.T) * full.width, 0);
  int expected_drops = 0;
  for (int t = 0; t < p.T; ++t)
    for (int j = 0; j < full.count[t]; ++j) {
      int const e = full.expert[t * full.width + j];
      if (used[e] < 30) ++used[e], keep[t * full.width + j] = 1;
      else ++expected_drops;
    }
  REQUIRE(expected_drops > 0);
  REQUIRE(st.dropped == expected_drops);
  for (int e = 0; e < p.E; ++e) REQUIRE(st.tokens_per_expert[e] <= 30);
  moe_forward(context<cpu>{2}, r, a);
  double const err = rel_diff(p.out, p.reference(r, activation::gelu, [&](int t, int j) {
    return keep[std::size_t(t) * full.width + j] != 0;
  }));
  INFO("relative error " << err);
  REQUIRE(err <= 1e-5);
}

TEST_CASE("dispatch is a stable permutation grouped by expert, and the statistics match their formulas",
          "[router][moe][cpu]") {
  moe_problem p(200, 16, 8, 16, test::fresh_seed());
  moe_stats st;
  top_p const r{0.6f, 1, 4, false};
  auto const rt = route(context<cpu>{2}, r, p.args(activation::gelu), &st);
  std::vector<int> seen(std::size_t(p.T) * rt.width, 0);
  for (int e = 0; e < p.E; ++e)
    for (int s = rt.offsets[e]; s < rt.offsets[e + 1]; ++s) {
      int const entry = rt.slot_entry[s];
      REQUIRE(rt.expert[entry] == e);
      REQUIRE(rt.entry_slot[entry] == s);
      if (s > rt.offsets[e]) REQUIRE(entry > rt.slot_entry[s - 1]);  // tokens in order within an expert
      ++seen[entry];
    }
  int total = 0;
  for (int t = 0; t < p.T; ++t)
    for (int j = 0; j < rt.width; ++j) {
      REQUIRE(seen[t * rt.width + j] == (j < rt.count[t] ? 1 : 0));
      total += j < rt.count[t];
    }
  REQUIRE(std::accumulate(st.tokens_per_expert.begin(), st.tokens_per_expert.end(), 0) == total);
  REQUIRE(st.mean_active == Approx(double(total) / p.T));
  // Balance loss and z-loss from their definitions.
  std::vector<double> f(p.E, 0), P(p.E, 0);
  double z2 = 0;
  for (int t = 0; t < p.T; ++t) {
    std::vector<float> const z = p.logits(t);
    auto const pr = softmax_ref(z);
    f[order_desc(pr)[0]] += 1.0 / p.T;
    for (int e = 0; e < p.E; ++e) P[e] += pr[e] / p.T;
    double mx = *std::max_element(z.begin(), z.end()), s = 0;
    for (float v : z) s += std::exp(v - mx);
    z2 += (mx + std::log(s)) * (mx + std::log(s)) / p.T;
  }
  double lb = 0;
  for (int e = 0; e < p.E; ++e) lb += p.E * f[e] * P[e];
  REQUIRE(st.balance_loss == Approx(lb).epsilon(1e-4));
  REQUIRE(st.z_loss == Approx(z2).epsilon(1e-4));
}

TEST_CASE("a token's output does not depend on the rest of its batch", "[router][moe][cpu]") {
  moe_problem p(64, 32, 64, 8, test::fresh_seed());
  moe_forward(context<cpu>{2}, top_k{2, true}, p.args(activation::gelu));
  auto const full = p.out;
  // Token 5 alone, and token 5 among a different batch (the first 7 tokens).
  for (int batch : {1, 7}) {
    moe_problem q = p;
    q.T = batch;
    int const src = 5, dst = batch == 1 ? 0 : 5;
    if (batch == 1) std::copy_n(p.x.begin() + src * p.d, p.d, q.x.begin());
    q.out.assign(std::size_t(batch) * p.d, 0.f);
    moe_forward(context<cpu>{2}, top_k{2, true}, q.args(activation::gelu));
    for (int k = 0; k < p.d; ++k)
      REQUIRE(q.out[std::size_t(dst) * p.d + k] == Approx(full[std::size_t(src) * p.d + k]).epsilon(1e-5).margin(1e-6));
  }
}

TEST_CASE("bad routing input is rejected", "[router][errors][cpu]") {
  moe_problem p(10, 8, 8, 4, 1);
  auto a = p.args(activation::gelu);
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{5, true}, a), Contains("k = 5"));
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{0, true}, a), Contains("k = 0"));
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_p{0.f, 1, 2, false}, a), Contains("p = 0"));
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_p{1.5f, 1, 2, false}, a), Contains("p = 1.5"));
  auto b = a;
  b.experts = 0;
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{1, true}, b), Contains("E = 0"));
  b = a;
  b.w_gate = nullptr;
  b.act = activation::swiglu;
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{1, true}, b), Contains("w_gate"));
  b = a;
  b.capacity_factor = -1.f;
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{1, true}, b), Contains("capacity_factor = -1"));
  b = a;
  b.shared_experts = 1;
  b.w_shared_up = nullptr;
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{1, true}, b), Contains("shared_experts = 1"));
  p.x[3] = std::nanf("");
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, top_k{1, true}, p.args(activation::gelu)), Contains("not finite"));
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, biased<top_k>{top_k{1, true}, nullptr}, a), Contains("bias"));
}

TEST_CASE("expert choice: each expert takes its top tokens; output equals the per-token loop",
          "[router][moe][expert_choice][cpu]") {
  moe_problem p(50, 16, 32, 5, test::fresh_seed());
  auto a = p.args(activation::gelu);
  expert_choice const ec{2.f};  // c = ⌈2·50/5⌉ = 20 tokens per expert
  moe_stats st;
  auto const rt = route(context<cpu>{2}, ec, a, &st);
  // Plain loop: probabilities, then each expert's top-20 tokens.
  std::vector<std::vector<double>> prob(p.T);
  for (int t = 0; t < p.T; ++t) {
    std::vector<float> const z = p.logits(t);
    prob[t] = softmax_ref(z);
  }
  std::vector<std::vector<int>> chooses(p.T);
  for (int e = 0; e < p.E; ++e) {
    std::vector<int> idx(p.T);
    std::iota(idx.begin(), idx.end(), 0);
    std::stable_sort(idx.begin(), idx.end(), [&](int u, int v) { return prob[u][e] > prob[v][e]; });
    for (int i = 0; i < 20; ++i) chooses[idx[i]].push_back(e);
  }
  for (int t = 0; t < p.T; ++t) {
    std::sort(chooses[t].begin(), chooses[t].end());
    REQUIRE(rt.count[t] == int(chooses[t].size()));
    for (int j = 0; j < rt.count[t]; ++j) REQUIRE(rt.expert[t * rt.width + j] == chooses[t][j]);
  }
  REQUIRE(st.mean_active == Approx(2.0));
  moe_forward(context<cpu>{2}, ec, a);
  std::vector<double> ref(std::size_t(p.T) * p.d, 0.0);
  for (int t = 0; t < p.T; ++t)
    for (int e : chooses[t]) {
      std::size_t const off = std::size_t(e) * p.f * p.d;
      auto const y = p.ffn(p.up.data() + off, p.gate.data() + off, p.down.data() + off, t, activation::gelu);
      for (int k = 0; k < p.d; ++k) ref[std::size_t(t) * p.d + k] += prob[t][e] * y[k];
    }
  REQUIRE(rel_diff(p.out, ref) <= 1e-5);
  REQUIRE_THROWS_WITH(moe_forward(context<cpu>{1}, expert_choice{0.f}, a), Contains("capacity = 0"));
}
