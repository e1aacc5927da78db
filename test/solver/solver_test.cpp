// DPM-Solver++ against problems whose exact answer is known (shared/notes/solvers_and_routing.md §6).

#include <drdiff/cpu/solver.hpp>
#include <drdiff/solver/problems.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

using namespace drdiff;
using namespace drdiff::solver;
using Catch::Matchers::Contains;

namespace {

struct gaussian : solver::gaussian_problem {
  void x0(double const* x, double t, double* out, std::size_t n) const { (*this)(x, t, out, n); }
};

/// Max error over start values after sampling t: 1 → 1e-3 with `steps` uniform-λ steps.
double gaussian_error(gaussian const& g, dpmpp_config cfg, int steps) {
  std::vector<double> const starts = {-2.0, -0.5, 0.3, 1.1, 2.4};
  std::size_t const n = starts.size();
  auto grid = make_grid(g.ops, steps, spacing::uniform_lambda, 1.0, 1e-3);
  std::vector<double> x = starts, ws(3 * n);
  cfg.lower_order_final = false;
  dpmpp_sample(context<cpu>{1}, g.ops, cfg, grid, [&](double const* xs, double t, double* out) { g.x0(xs, t, out, n); },
               x.data(), n, ws.data());
  double err = 0;
  for (std::size_t i = 0; i < n; ++i) err = std::max(err, std::abs(x[i] - g.exact(starts[i], 1.0, 1e-3)));
  return err;
}

double measured_order(dpmpp_config const& cfg, int n0) {
  gaussian const g;
  double const e1 = gaussian_error(g, cfg, n0), e2 = gaussian_error(g, cfg, 2 * n0), e3 = gaussian_error(g, cfg, 4 * n0);
  INFO("errors " << e1 << " " << e2 << " " << e3);
  return 0.5 * (std::log2(e1 / e2) + std::log2(e2 / e3));
}

dpmpp_config make(int order, second_order s2 = second_order::midpoint, third_order s3 = third_order::taylor) {
  dpmpp_config c;
  c.order = order;
  c.second = s2;
  c.third = s3;
  return c;
}

}  // namespace

TEST_CASE("DPM-Solver++ reaches its order on Gaussian data", "[solver][dpmpp][order][cpu]") {
  double const o1 = measured_order(make(1), 40);
  double const o2m = measured_order(make(2), 40);
  double const o2h = measured_order(make(2, second_order::heun), 40);
  double const o3p = measured_order(make(3, second_order::midpoint, third_order::published), 40);
  double const o3t = measured_order(make(3, second_order::midpoint, third_order::taylor), 40);
  auto two_s = make(2);
  two_s.singlestep = true;
  double const o2s = measured_order(two_s, 40);
  INFO("orders: DDIM " << o1 << ", 2M midpoint " << o2m << ", 2M heun " << o2h << ", 3M published " << o3p
                       << ", 3M Taylor " << o3t << ", 2S " << o2s);
  REQUIRE(std::abs(o1 - 1.0) <= 0.15);
  REQUIRE(std::abs(o2m - 2.0) <= 0.15);
  REQUIRE(std::abs(o2h - 2.0) <= 0.15);
  REQUIRE(std::abs(o3p - 2.0) <= 0.15);
  REQUIRE(o3t >= 3.0 - 0.15);  // 3 in general; the Gaussian's smooth x̂0 lets it reach 4 here
  REQUIRE(std::abs(o2s - 2.0) <= 0.15);
}

TEST_CASE("DDIM is exact for a point mass, and every solver for the identity flow", "[solver][dpmpp][exact][cpu]") {
  auto const ops = solver::ops(vp_linear{});
  auto grid = make_grid(ops, 7, spacing::uniform_lambda, 1.0, 1e-3);
  std::vector<double> x = {-1.3, 0.2, 2.9}, ws(9);
  double const mu = 0.42;
  dpmpp_sample(context<cpu>{1}, ops, make(1), grid, [&](double const*, double, double* out) {
    for (int i = 0; i < 3; ++i) out[i] = mu;
  }, x.data(), 3, ws.data());
  // x_t = σ_t/σ_T·(x_T − α_T μ) + α_t μ exactly
  std::vector<double> const x0 = {-1.3, 0.2, 2.9};
  for (int i = 0; i < 3; ++i) {
    double const ex = ops.sigma(1e-3) / ops.sigma(1.0) * (x0[i] - ops.alpha(1.0) * mu) + ops.alpha(1e-3) * mu;
    REQUIRE(std::abs(x[i] - ex) <= 1e-12);
  }
  // N(0, 1) data: the flow is the identity. The solvers are not exact here (x̂0 = α_t x is not
  // polynomial in λ), but must converge to x_T at their order.
  gaussian g;
  g.mu = 0.0;
  g.s = 1.0;
  for (auto cfg : {make(1), make(2), make(2, second_order::heun), make(3, second_order::midpoint, third_order::published),
                   make(3)}) {
    double e[2];
    for (int r = 0; r < 2; ++r) {
      auto gr = make_grid(ops, 100 << r, spacing::uniform_lambda, 1.0, 1e-3);
      std::vector<double> y = x0, w(9);
      cfg.lower_order_final = false;
      dpmpp_sample(context<cpu>{1}, g.ops, cfg, gr, [&](double const* xs, double t, double* out) { g.x0(xs, t, out, 3); },
                   y.data(), 3, w.data());
      e[r] = 0;
      for (int i = 0; i < 3; ++i) e[r] = std::max(e[r], std::abs(y[i] - x0[i]));
    }
    INFO("order " << cfg.order << ": errors " << e[0] << ", " << e[1]);
    REQUIRE(e[1] <= (cfg.order == 1 ? 5e-2 : 2e-3));
    REQUIRE(std::log2(e[0] / e[1]) >= 0.85 * std::min(cfg.order, 2));
  }
}

TEST_CASE("Taylor 3M is exact when the data prediction is quadratic in lambda; the published form is not",
          "[solver][dpmpp][exact][cpu]") {
  // One step at λ = (−1, −0.7, −0.4 → −0.1), x̂0 = 0.3 − 0.8λ + 0.45λ², x_s = 1.234.
  auto const ops = solver::ops(vp_linear{});
  double const l[4] = {-1.0, -0.7, -0.4, -0.1};
  double t[4];
  for (int i = 0; i < 4; ++i) t[i] = ops.t_of_lambda(l[i]);
  auto q = [](double lam) { return 0.3 - 0.8 * lam + 0.45 * lam * lam; };
  auto F = [](double lam) { return std::exp(lam) * (0.3 - 0.8 * (lam - 1) + 0.45 * (lam * lam - 2 * lam + 2)); };
  double const xs = 1.234;
  double const exact = ops.sigma(t[3]) / ops.sigma(t[2]) * xs + ops.sigma(t[3]) * (F(l[3]) - F(l[2]));
  auto step = [&](third_order v) {
    auto cfg = make(3, second_order::midpoint, v);
    auto k = dpmpp_coefficients(ops, cfg, 3, t[2], t[3], t[1], t[0]);
    return k.a * xs + k.b[0] * q(l[2]) + k.b[1] * q(l[1]) + k.b[2] * q(l[0]);
  };
  REQUIRE(std::abs(step(third_order::taylor) - exact) <= 1e-12);
  double const published = std::abs(step(third_order::published) - exact);
  REQUIRE(published == Approx(1.26e-3).epsilon(0.02));  // the notes' measured defect
}

TEST_CASE("schedules: lambda round-trips through t(lambda)", "[solver][schedule][cpu]") {
  std::vector<double> abar(1000);
  for (int i = 0; i < 1000; ++i) abar[i] = 1.0 - std::sqrt(i / 1000.0 + 1e-4);
  auto check = [](auto const& ops, double t0, double t1) {
    for (int i = 0; i <= 20; ++i) {
      double const t = t0 + (t1 - t0) * i / 20.0;
      REQUIRE(ops.t_of_lambda(ops.lambda(t)) == Approx(t).margin(1e-9));
      REQUIRE(ops.alpha(t) * ops.alpha(t) + ops.sigma(t) * ops.sigma(t) == Approx(1.0).margin(1e-12));
    }
  };
  check(solver::ops(vp_linear{}), 1e-3, 1.0);
  check(solver::ops(vp_cosine{}), 1e-3, 0.99);
  check(solver::ops(vp_sqrt{}), 0.0, 0.999);
  auto const d = solver::ops(vp_discrete(abar));
  check(d, 0.002, d.t_max());
  REQUIRE(d.lambda(d.t_max()) >= -5.1 - 1e-9);  // λ clipped
}

TEST_CASE("bad solver input is rejected with a clear message", "[solver][errors][cpu]") {
  auto const ops = solver::ops(vp_linear{});
  REQUIRE_THROWS_WITH(make_grid(ops, 0, spacing::uniform_lambda, 1.0, 1e-3), Contains("steps = 0"));
  REQUIRE_THROWS_WITH(make_grid(ops, 5, spacing::uniform_t, 2.0, 1e-3), Contains("t = 2"));
  REQUIRE_THROWS_WITH(check_grid(ops, {1.0, 0.5, 0.5, 0.1}), Contains("duplicate"));
  REQUIRE_THROWS_WITH(check_grid(ops, {1.0, 0.2, 0.5}), Contains("strictly decreasing"));
  auto cfg = make(4);
  REQUIRE_THROWS_WITH(cfg.validate(), Contains("order = 4"));
  cfg = make(0);
  REQUIRE_THROWS_WITH(cfg.validate(), Contains("order = 0"));
  cfg = make(3);
  cfg.singlestep = true;
  REQUIRE_THROWS_WITH(cfg.validate(), Contains("singlestep"));
  cfg = make(3);
  cfg.sde = true;
  REQUIRE_THROWS_WITH(cfg.validate(), Contains("SDE"));
  std::vector<double> x = {0.1, std::nan(""), 0.3}, ws(9);
  auto grid = make_grid(ops, 4, spacing::uniform_lambda, 1.0, 1e-3);
  auto model = [](double const*, double, double* out) { out[0] = out[1] = out[2] = 0; };
  REQUIRE_THROWS_WITH(dpmpp_sample(context<cpu>{1}, ops, make(2), grid, model, x.data(), 3, ws.data()),
                      Contains("x[1] = nan"));
  std::vector<double> y = {0.1, 0.2, 0.3};
  auto bad_model = [](double const*, double, double* out) { out[0] = out[1] = 0; out[2] = INFINITY; };
  REQUIRE_THROWS_WITH(dpmpp_sample(context<cpu>{1}, ops, make(2), grid, bad_model, y.data(), 3, ws.data()),
                      Contains("data prediction[2] = inf"));
  REQUIRE_THROWS_WITH(vp_discrete({0.9, 0.95}), Contains("must decrease"));
}

TEST_CASE("the final step to sigma = 0 returns the data prediction", "[solver][dpmpp][cpu]") {
  auto const ops = solver::ops(vp_linear{});
  auto grid = make_grid(ops, 6, spacing::uniform_lambda, 1.0, 1e-3);
  auto cfg = make(2);
  cfg.final_to_zero = true;
  std::vector<double> x = {0.5, -0.5}, ws(6);
  double last_pred = 0;
  dpmpp_sample(context<cpu>{1}, ops, cfg, grid, [&](double const* xs, double, double* out) {
    out[0] = 0.9 * xs[0];
    out[1] = 0.9 * xs[1];
    last_pred = out[0];
  }, x.data(), 2, ws.data());
  REQUIRE(x[0] == last_pred);
  for (auto const& k : dpmpp_plan(ops, cfg, grid)) REQUIRE(std::isfinite(k.a));
}

TEST_CASE("SDE-DPM-Solver++ keeps the exact Gaussian marginals", "[solver][dpmpp][sde][cpu]") {
  gaussian const g;
  std::size_t const n = 40000;
  double const t0 = 1.0, t1 = 1e-3;
  // Start from the exact marginal at t0 (drawn with the same counter-based source, step −1).
  solver::gaussian_noise const start{1234};
  int const steps_sde = 2000;  // weak error at 200 steps: −4.5 % (order 1) / −1.1 % (order 2) in the variance
  double const a0 = g.ops.alpha(t0), sd0 = std::sqrt(a0 * a0 * g.s * g.s + g.ops.sigma(t0) * g.ops.sigma(t0));
  for (int order : {1, 2}) {
    for (auto variant : {second_order::midpoint, second_order::heun}) {
      if (order == 1 && variant == second_order::heun) continue;
      std::vector<double> x(n), ws(3 * n);
      for (std::size_t i = 0; i < n; ++i) x[i] = a0 * g.mu + sd0 * start(-1, i);
      auto cfg = make(order, variant);
      cfg.sde = true;
      auto grid = make_grid(g.ops, steps_sde, spacing::uniform_lambda, t0, t1);
      dpmpp_sample(context<cpu>{}, g.ops, cfg, grid,
                   [&](double const* xs, double t, double* out) { g.x0(xs, t, out, n); }, x.data(), n, ws.data(),
                   no_hook{}, no_hook{}, solver::gaussian_noise{99});
      double mean = 0, var = 0;
      for (double v : x) mean += v;
      mean /= n;
      for (double v : x) var += (v - mean) * (v - mean);
      var /= n - 1;
      double const a1 = g.ops.alpha(t1), v1 = a1 * a1 * g.s * g.s + g.ops.sigma(t1) * g.ops.sigma(t1);
      INFO("order " << order << ": mean " << mean << " vs " << a1 * g.mu << ", variance " << var << " vs " << v1);
      // Sampling error: sd(mean) = sqrt(v/n), sd(var) ≈ v·sqrt(2/n); allow 4 of each plus the
      // discretisation at 2000 steps (weak order 1: about 0.5 % of the variance).
      REQUIRE(std::abs(mean - a1 * g.mu) <= 4 * std::sqrt(v1 / n) + 2e-3);
      REQUIRE(std::abs(var - v1) <= 4 * v1 * std::sqrt(2.0 / n) + 3e-3);
    }
  }
}

TEST_CASE("the noise source is a reproducible standard normal", "[solver][noise][cpu]") {
  solver::gaussian_noise const z{7};
  double mean = 0, sq = 0;
  int const n = 200000;
  for (int i = 0; i < n; ++i) {
    double const v = z(3, std::uint64_t(i));
    mean += v;
    sq += v * v;
  }
  mean /= n;
  sq /= n;
  REQUIRE(std::abs(mean) < 4.0 / std::sqrt(double(n)));
  REQUIRE(std::abs(sq - 1.0) < 4.0 * std::sqrt(2.0 / n));
  REQUIRE(z(3, 12345) == solver::gaussian_noise{7}(3, 12345));
  REQUIRE(z(3, 12345) != z(4, 12345));
}

namespace {
std::vector<double> solve(solver::mixture_of_deltas const& m, dpmpp_config cfg, int steps,
                          std::vector<double> const& x_start) {
  auto const grid = make_grid(m.ops, steps, spacing::uniform_lambda, m.ops.t_of_lambda(-3.0), m.ops.t_of_lambda(2.5));
  std::vector<double> x = x_start, ws(3 * x.size());
  dpmpp_sample(context<cpu>{1}, m.ops, cfg, grid, m, x.data(), x.size(), ws.data());
  return x;
}
}  // namespace

TEST_CASE("mixture of deltas: 2M at 20 steps beats DDIM at 50, against a self-converged reference",
          "[solver][dpmpp][mixture][cpu]") {
  for (unsigned seed : {3u, 4u, 5u}) {
    solver::mixture_of_deltas const m(5, 3, 64, seed);
    std::mt19937 rng(seed + 100);
    std::normal_distribution<double> nd(0, 1);
    std::vector<double> x_start(std::size_t(m.P) * m.d);
    for (auto& e : x_start) e = nd(rng);
    auto ref_cfg = make(3);
    ref_cfg.lower_order_final = false;
    auto const ref = solve(m, ref_cfg, 20000, x_start);
    // Self-converged: halving the reference's step count moves it by far less than the errors below.
    REQUIRE(rms_diff(solve(m, ref_cfg, 10000, x_start), ref) < 1e-7);
    double const ddim50 = rms_diff(solve(m, make(1), 50, x_start), ref);
    double const m2_20 = rms_diff(solve(m, make(2), 20, x_start), ref);
    double const m2_10 = rms_diff(solve(m, make(2), 10, x_start), ref);
    INFO("seed " << seed << ": DDIM@50 " << ddim50 << ", 2M@20 " << m2_20 << ", 2M@10 " << m2_10);
    REQUIRE(m2_20 < ddim50);
  }
}

TEST_CASE("epsilon- and v-prediction adapters give the data prediction", "[solver][model][cpu]") {
  gaussian const g;
  std::size_t const n = 4;
  auto x0_model = [&](double const* x, double t, double* out) { g.x0(x, t, out, n); };
  // The same denoiser expressed as ε = (x − α x̂0)/σ and v = (α x − x̂0)/σ.
  auto eps_model = [&](double const* x, double t, double* out) {
    g.x0(x, t, out, n);
    for (std::size_t i = 0; i < n; ++i) out[i] = (x[i] - g.ops.alpha(t) * out[i]) / g.ops.sigma(t);
  };
  auto v_model = [&](double const* x, double t, double* out) {
    g.x0(x, t, out, n);
    for (std::size_t i = 0; i < n; ++i) out[i] = (g.ops.alpha(t) * x[i] - out[i]) / g.ops.sigma(t);
  };
  auto grid = make_grid(g.ops, 12, spacing::uniform_lambda, 1.0, 1e-3);
  auto solve = [&](auto&& model) {
    std::vector<double> x = {-1.0, 0.1, 0.9, 2.0}, ws(3 * n);
    dpmpp_sample(context<cpu>{1}, g.ops, make(2), grid, model, x.data(), n, ws.data());
    return x;
  };
  auto const a = solve(x0_model), b = solve(from_eps(g.ops, eps_model, n)), c = solve(from_v(g.ops, v_model, n));
  for (std::size_t i = 0; i < n; ++i) {
    REQUIRE(std::abs(a[i] - b[i]) <= 1e-12);
    REQUIRE(std::abs(a[i] - c[i]) <= 1e-12);
  }
}

TEST_CASE("hooks see every prediction and every state", "[solver][hooks][cpu]") {
  auto const ops = solver::ops(vp_linear{});
  auto grid = make_grid(ops, 8, spacing::uniform_t, 1.0, 1e-3);
  std::vector<double> x = {0.3, -0.2, 1.5}, ws(9);
  int x0_calls = 0, xt_calls = 0;
  dpmpp_sample(
      context<cpu>{1}, ops, make(2), grid, [](double const* xs, double, double* out) { for (int i = 0; i < 3; ++i) out[i] = 0.5 * xs[i]; },
      x.data(), 3, ws.data(),
      [&](double* x0, double) { ++x0_calls; x0[2] = 0.0; },          // e.g. clamp one coordinate
      [&](double* xt, double, int) { ++xt_calls; xt[0] = 0.3; });    // e.g. keep a prompt position clean
  REQUIRE(x0_calls == 8);
  REQUIRE(xt_calls == 8);
  REQUIRE(x[0] == 0.3);
}
