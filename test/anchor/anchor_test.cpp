// Semantic anchor states on the CPU: the soft absorbing forward process, the projectors against
// plain loops, rounding against brute force, guidance and re-anchoring through the solver hooks,
// anchor positions as HSA global tokens, bad input, and the step study's assertion.

#include "anchor_study.hpp"
#include "../support/drdiff_test.hpp"

#include <drdiff/cpu/anchor.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

using namespace drdiff;
using Catch::Matchers::Contains;

namespace {

template <class T>
std::vector<T> randn(std::size_t n, std::uint64_t seed, double scale = 1.0) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<T> v(n);
  for (auto& e : v) e = T(nd(rng));
  return v;
}

// Brute-force nearest embedding in long double: the best score and the set of ids within `tol` of it.
template <class T>
long double score(T const* x, T const* e, int d, anchor::metric m) {
  long double s = 0, n = 0;
  for (int k = 0; k < d; ++k) {
    s += (long double)x[k] * e[k];
    n += (long double)e[k] * e[k];
  }
  return m == anchor::metric::l2 ? s - 0.5L * n : s;
}

}  // namespace

TEST_CASE("absorb: source tokens stay clean, targets follow sqrt(ab)(x0-m)+sqrt(1-ab)eps+m, replacement rate",
          "[anchor]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  int const B = 3, N = 700, d = 16;
  auto x0 = randn<double>(std::size_t(B) * N * d, seed);
  auto m = randn<double>(d, seed + 1, 0.25);
  std::vector<unsigned char> target(std::size_t(B) * N);
  for (int i = 0; i < B * N; ++i) target[i] = (i % N) >= 100;  // the first 100 tokens of each sequence are the prompt
  std::vector<double> ab = {0.9, 0.3, 0.0};
  anchor::soft_absorbing s{0.0, seed};
  std::vector<double> xt(x0.size(), std::nan(""));
  anchor::absorb_args<double> a;
  a.shape = {B, N, d};
  a.x0 = x0.data(); a.maybe_m = m.data(); a.alpha_bar = ab.data(); a.maybe_target = target.data(); a.xt = xt.data();
  a.stream = 5;
  anchor::absorb(context<cpu>{2}, s, a);
  // Without replacement, eps = (xt − √ᾱ(x0 − m) − m)/√(1−ᾱ) is standard normal; prompts are untouched.
  for (int b = 0; b < B; ++b) {
    double sum = 0, sq = 0;
    int cnt = 0;
    for (int i = 0; i < N; ++i)
      for (int k = 0; k < d; ++k) {
        std::size_t const j = (std::size_t(b) * N + i) * d + k;
        if (i < 100) {
          REQUIRE(xt[j] == x0[j]);
          continue;
        }
        double const e = (xt[j] - std::sqrt(ab[b]) * (x0[j] - m[k]) - m[k]) / std::sqrt(1 - ab[b]);
        sum += e;
        sq += e * e;
        ++cnt;
      }
    double const mean = sum / cnt, var = sq / cnt - mean * mean;
    CHECK(std::abs(mean) < 5.0 / std::sqrt(double(cnt)));
    CHECK(std::abs(var - 1.0) < 5.0 * std::sqrt(2.0 / cnt));
  }
  // Same stream: the same numbers, whatever the threads; another stream: different numbers.
  std::vector<double> again(x0.size());
  a.xt = again.data();
  anchor::absorb(context<cpu>{1}, s, a);
  CHECK(again == xt);
  a.stream = 6;
  anchor::absorb(context<cpu>{1}, s, a);
  CHECK(again != xt);

  // Replacement: a target token becomes m exactly with probability √(1−ᾱ)·rate.
  s.rate = 0.5;
  anchor::absorb(context<cpu>{2}, s, a);
  for (int b = 0; b < B; ++b) {
    int replaced = 0;
    for (int i = 100; i < N; ++i) {
      bool all = true;
      for (int k = 0; k < d; ++k) all = all && again[(std::size_t(b) * N + i) * d + k] == m[k];
      replaced += all;
    }
    double const p = std::sqrt(1 - ab[b]) * 0.5, n = N - 100;
    CHECK(std::abs(replaced - p * n) <= 5 * std::sqrt(n * p * (1 - p)) + 1);
  }
  // ᾱ = 1 and no replacement: x_t = x_0 exactly; in place works.
  std::vector<double> one(B, 1.0);
  a.alpha_bar = one.data();
  a.xt = x0.data();
  s.rate = 0.0;
  auto const copy = x0;
  anchor::absorb(context<cpu>{2}, s, a);
  for (std::size_t j = 0; j < x0.size(); ++j) REQUIRE(x0[j] == Approx(copy[j]).margin(1e-15));
}

TEST_CASE("round_to_nearest equals brute force (l2 and dot, float and double), ties go to the smaller id",
          "[anchor]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  for (auto metric : {anchor::metric::l2, anchor::metric::dot}) {
    int const V = 2500, d = 24, B = 2, N = 150;  // V spans two score blocks
    auto table = randn<double>(std::size_t(V) * d, seed);
    for (int k = 0; k < d; ++k) table[std::size_t(1700) * d + k] = table[std::size_t(900) * d + k];  // a duplicate row
    auto x = randn<double>(std::size_t(B) * N * d, seed + 7, 1.5);
    for (int k = 0; k < d; ++k) x[std::size_t(3) * d + k] = table[std::size_t(1700) * d + k];  // token 3 sits on it
    std::vector<int> ids(std::size_t(B) * N, -1);
    std::vector<double> out(x.size(), std::nan(""));
    anchor::nearest_embedding<double> p{table.data(), V, d, metric};
    anchor::round_to_nearest(context<cpu>{2}, p, {B, N, d}, x.data(), ids.data(), out.data());
    for (int t = 0; t < B * N; ++t) {
      long double best = -INFINITY;
      int arg = -1;
      for (int v = 0; v < V; ++v) {
        long double const s = score(x.data() + std::size_t(t) * d, table.data() + std::size_t(v) * d, d, metric);
        if (s > best) best = s, arg = v;
      }
      long double const got = score(x.data() + std::size_t(t) * d, table.data() + std::size_t(ids[t]) * d, d, metric);
      INFO("token " << t << " id " << ids[t] << " brute " << arg);
      REQUIRE(double(best - got) <= 1e-10 * (1 + std::abs(double(best))));
      for (int k = 0; k < d; ++k) REQUIRE(out[std::size_t(t) * d + k] == table[std::size_t(ids[t]) * d + k]);
    }
    if (metric == anchor::metric::l2) CHECK(ids[3] == 900);  // tie between 900 and 1700

    // float: the same ids except where two scores are within float rounding of each other
    std::vector<float> tf(table.begin(), table.end()), xf(x.begin(), x.end());
    std::vector<int> idf(ids.size());
    anchor::nearest_embedding<float> pf{tf.data(), V, d, metric};
    anchor::round_to_nearest(context<cpu>{1}, pf, {B, N, d}, xf.data(), idf.data());
    for (int t = 0; t < B * N; ++t) {
      long double const a = score(xf.data() + std::size_t(t) * d, tf.data() + std::size_t(ids[t]) * d, d, metric);
      long double const b = score(xf.data() + std::size_t(t) * d, tf.data() + std::size_t(idf[t]) * d, d, metric);
      REQUIRE(double(std::abs(a - b)) <= 1e-4 * (1 + std::abs(double(a))));
    }
  }
}

TEST_CASE("projectors: identity, segment_pool (rank 0 and r), linear against plain loops", "[anchor]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  int const B = 2, N = 45, d = 12, L = 8, r = 3;  // N not a multiple of L: the last segment has 5 tokens
  anchor::token_shape const sh{B, N, d};
  auto x = randn<float>(std::size_t(B) * N * d, seed);
  std::vector<float> out(x.size(), std::nanf(""));
  anchor::project(context<cpu>{1}, anchor::identity{}, sh, x.data(), out.data());
  CHECK(out == x);

  auto down = randn<float>(std::size_t(r) * d, seed + 1, 0.3), up = randn<float>(std::size_t(d) * r, seed + 2, 0.3);
  for (int rank : {0, r}) {
    anchor::segment_pool<float> p{L, rank, rank ? down.data() : nullptr, rank ? up.data() : nullptr};
    std::fill(out.begin(), out.end(), std::nanf(""));
    anchor::project(context<cpu>{2}, p, sh, x.data(), out.data());
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < N; ++i) {
        int const i0 = i / L * L, i1 = std::min(N, i0 + L);
        std::vector<double> mean(d, 0.0), want(d, 0.0);
        for (int j = i0; j < i1; ++j)
          for (int k = 0; k < d; ++k) mean[k] += x[(std::size_t(b) * N + j) * d + k] / double(i1 - i0);
        if (rank) {
          std::vector<double> z(r, 0.0);
          for (int q = 0; q < r; ++q)
            for (int k = 0; k < d; ++k) z[q] += down[std::size_t(q) * d + k] * mean[k];
          for (int k = 0; k < d; ++k)
            for (int q = 0; q < r; ++q) want[k] += up[std::size_t(k) * r + q] * z[q];
        } else {
          want = mean;
        }
        for (int k = 0; k < d; ++k)
          REQUIRE(out[(std::size_t(b) * N + i) * d + k] == Approx(want[k]).epsilon(1e-5).margin(1e-6));
      }
  }

  auto W = randn<float>(std::size_t(d) * d, seed + 3, 0.3), bias = randn<float>(d, seed + 4);
  for (bool with_bias : {false, true}) {
    anchor::linear<float> p{W.data(), with_bias ? bias.data() : nullptr, d};
    std::fill(out.begin(), out.end(), std::nanf(""));
    anchor::project(context<cpu>{2}, p, sh, x.data(), out.data());
    for (int t = 0; t < B * N; ++t)
      for (int i = 0; i < d; ++i) {
        double want = with_bias ? bias[i] : 0.0;
        for (int j = 0; j < d; ++j) want += double(W[std::size_t(i) * d + j]) * x[std::size_t(t) * d + j];
        REQUIRE(out[std::size_t(t) * d + i] == Approx(want).epsilon(1e-5).margin(1e-5));
      }
  }
}

TEST_CASE("guidance: gamma schedule, blend at the chosen steps, keep_clean and chain as solver hooks", "[anchor]") {
  solver::schedule_ops<solver::vp_linear> ops{};
  anchor::guidance_schedule s;
  s.steps = {0, 2};
  CHECK(s.gamma(0.0, 0) == 1.0);
  CHECK(s.gamma(0.0, 1) == 0.0);
  s.steps.clear();
  s.lambda_min = -1.0;
  s.lambda_max = 3.0;
  s.gamma_start = 0.2;
  s.gamma_end = 0.6;
  CHECK(s.gamma(1.0, 7) == Approx(0.4));
  CHECK(s.gamma(-1.5, 7) == 0.0);
  CHECK(s.gamma(3.5, 7) == 0.0);

  // A solve of 5 steps with guidance at steps 1 and 3 toward the identity... of a fixed vector.
  int const N = 6, d = 4;
  anchor::token_shape const sh{1, N, d};
  std::vector<double> anchor_vec(std::size_t(N) * d, 0.5), scratch(anchor_vec.size());
  auto project = [&](double const*, double* out) { std::copy(anchor_vec.begin(), anchor_vec.end(), out); };
  anchor::guidance_schedule g;
  g.steps = {1, 3};
  g.gamma_start = g.gamma_end = 0.25;
  auto hook = anchor::make_guidance(context<cpu>{1}, sh, project, g, ops, scratch.data());
  std::vector<double> x0(anchor_vec.size(), 2.0);
  hook(x0.data(), 0.5, 1);
  for (double v : x0) REQUIRE(v == Approx(2.0 + 0.25 * (0.5 - 2.0)));
  hook(x0.data(), 0.5, 2);  // not a chosen step: unchanged
  for (double v : x0) REQUIRE(v == Approx(1.625));
  CHECK(hook.applied() == 1);

  // Inside dpmpp_sample: steps 1 and 3 see the hook; keep_clean holds the prompt at its clean values.
  std::vector<unsigned char> target(N, 1);
  target[0] = target[1] = 0;
  std::vector<double> clean(anchor_vec.size(), -3.0);
  anchor::keep_clean<cpu, double> keep(context<cpu>{1}, sh, target.data(), clean.data());
  auto guided = anchor::make_guidance(context<cpu>{1}, sh, project, g, ops, scratch.data());
  std::vector<int> seen;
  auto model = [&](double const* x, double, double* out) {
    for (std::size_t i = 0; i < anchor_vec.size(); ++i) out[i] = 0.9 * x[i];
  };
  auto recorder = [&](double*, double, int step) { seen.push_back(step); };
  std::vector<double> x(anchor_vec.size(), 1.0), ws(3 * x.size());
  auto const grid = solver::make_grid(ops, 5, solver::spacing::uniform_lambda, 1.0, 1e-3);
  solver::dpmpp_sample(context<cpu>{1}, ops, solver::dpmpp_config{}, grid, model, x.data(), x.size(), ws.data(),
                       anchor::chain(anchor::chain(recorder, std::ref(guided)), keep), keep);
  CHECK(seen == std::vector<int>{0, 1, 2, 3, 4});
  CHECK(guided.applied() == 2);
  for (int k = 0; k < 2 * d; ++k) REQUIRE(x[k] == -3.0);
  for (std::size_t k = 2 * d; k < x.size(); ++k) REQUIRE(x[k] != -3.0);
}

TEST_CASE("anchor positions become HSA global tokens", "[anchor]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  int const N = 300;
  std::vector<unsigned char> target(N, 1);
  for (int i : {0, 1, 2, 77, 150, 299}) target[i] = 0;
  auto const pos = anchor::anchor_positions(target.data(), N);
  REQUIRE(pos == std::vector<int>{0, 1, 2, 77, 150, 299});
  auto const policy = attn::local_window{16} | anchor::as_global_tokens(pos);
  test::problem<float> pr(1, N, 2, 32, seed);
  std::vector<float> o2, l2;
  attention(context<cpu>{2}, policy, pr.args());
  attention_reference(policy, pr.args_into(o2, l2));
  for (std::size_t i = 0; i < o2.size(); ++i) REQUIRE(pr.o[i] == Approx(o2[i]).epsilon(1e-4).margin(1e-5));
  // The global rows see every key: row 77's output differs from a window-only run.
  std::vector<float> o3, l3;
  attention_reference(attn::local_window{16}, pr.args_into(o3, l3));
  CHECK(o3[std::size_t(77) * 64] != o2[std::size_t(77) * 64]);
}

TEST_CASE("anchor bad input gets a drdiff::error naming the parameter", "[anchor][errors]") {
  anchor::guidance_schedule g;
  g.gamma_start = 1.5;
  CHECK_THROWS_WITH(g.validate(), Contains("gamma_start = 1.5"));
  g.gamma_start = 0.5;
  g.gamma_end = -0.1;
  CHECK_THROWS_WITH(g.validate(), Contains("gamma_end = -0.1"));
  g.gamma_end = 0.5;
  g.lambda_min = 2;
  g.lambda_max = 1;
  CHECK_THROWS_WITH(g.validate(), Contains("lambda_min = 2"));
  g.lambda_min = 0;
  g.steps = {3, -1};
  CHECK_THROWS_WITH(g.validate(), Contains("steps[1] = -1"));

  std::vector<float> x(64, 1.f), out(64), table(32, 1.f);
  std::vector<int> ids(8);
  anchor::token_shape const sh{1, 8, 8};
  CHECK_THROWS_WITH(anchor::project(context<cpu>{1}, anchor::segment_pool<float>{0}, sh, x.data(), out.data()),
                    Contains("length = 0"));
  CHECK_THROWS_WITH(anchor::project(context<cpu>{1}, anchor::segment_pool<float>{4, 2}, sh, x.data(), out.data()),
                    Contains("rank = 2"));
  anchor::nearest_embedding<float> ne{table.data(), 0, 8};
  CHECK_THROWS_WITH(anchor::round_to_nearest(context<cpu>{1}, ne, sh, x.data(), ids.data()), Contains("vocab = 0"));
  ne = {table.data(), 8, 4};
  CHECK_THROWS_WITH(anchor::round_to_nearest(context<cpu>{1}, ne, sh, x.data(), ids.data()),
                    Contains("table has dim = 4"));
  ne = {table.data(), 4, 8};
  CHECK_THROWS_WITH(anchor::round_to_nearest(context<cpu>{1}, ne, sh, x.data(), nullptr), Contains("ids"));
  std::vector<char> small(8);
  CHECK_THROWS_WITH(anchor::round_to_nearest(context<cpu>{1}, ne, sh, x.data(), ids.data(), static_cast<float*>(nullptr), small.data(), 8),
                    Contains("workspace of 8 bytes"));
  x[9] = std::nanf("");
  CHECK_THROWS_WITH(anchor::round_to_nearest(context<cpu>{1}, ne, sh, x.data(), ids.data()), Contains("token 1"));
  x[9] = 1.f;
  anchor::linear<float> lin{table.data(), nullptr, 4};
  CHECK_THROWS_WITH(anchor::project(context<cpu>{1}, lin, sh, x.data(), out.data()), Contains("dim = 8"));
  lin.dim = 8;
  CHECK_THROWS_WITH(anchor::project(context<cpu>{1}, lin, sh, x.data(), x.data()), Contains("in place"));
  CHECK_THROWS_WITH(anchor::project(context<cpu>{1}, anchor::identity{}, anchor::token_shape{1, 0, 8}, x.data(),
                                    out.data()),
                    Contains("seq = 0"));

  std::vector<double> ab = {1.2};
  anchor::absorb_args<float> a;
  a.shape = sh;
  a.x0 = x.data();
  a.xt = out.data();
  a.alpha_bar = ab.data();
  CHECK_THROWS_WITH(anchor::absorb(context<cpu>{1}, anchor::soft_absorbing{}, a), Contains("alpha_bar[0] = 1.2"));
  ab[0] = 0.5;
  CHECK_THROWS_WITH(anchor::absorb(context<cpu>{1}, anchor::soft_absorbing{1.5}, a), Contains("rate = 1.5"));
  a.alpha_bar = nullptr;
  CHECK_THROWS_WITH(anchor::absorb(context<cpu>{1}, anchor::soft_absorbing{}, a), Contains("alpha_bar"));

  std::vector<float> scratch(64);
  solver::schedule_ops<solver::vp_linear> ops{};
  anchor::guidance_schedule bad;
  bad.gamma_end = 2.0;
  auto id = anchor::bind<float>(context<cpu>{1}, anchor::identity{}, sh);
  CHECK_THROWS_WITH(anchor::make_guidance(context<cpu>{1}, sh, id, bad, ops, scratch.data()), Contains("gamma_end = 2"));
  CHECK_THROWS_WITH(anchor::make_guidance(context<cpu>{1}, sh, id, anchor::guidance_schedule{}, ops, (float*)nullptr),
                    Contains("scratch"));
  CHECK_THROWS_WITH(anchor::anchor_positions(nullptr, 4), Contains("target"));
}

TEST_CASE("step study: late clamp guidance never needs more steps than none on the exact problem", "[anchor][study]") {
  auto const seed = unsigned(test::fresh_seed());
  INFO("seed " << seed);
  study::step_study const s(32, 32, 300, seed);
  auto const ideal = s.ideal();
  for (int order : {1, 2}) {
    study::setup plain, guided;
    plain.order = guided.order = order;
    guided.guided = true;
    guided.schedule = study::late_clamp();
    int const a = s.steps_needed(s.problem, plain, ideal, 0.99, 300);
    int const b = s.steps_needed(s.problem, guided, ideal, 0.99, 300);
    INFO("order " << order << ": " << a << " steps without guidance, " << b << " with");
    REQUIRE(a > 0);
    REQUIRE(b > 0);
    CHECK(b <= a);
  }
}
