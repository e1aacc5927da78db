#pragma once
// The anchor step study (docs/anchors.md): how many DPM-Solver++ steps a sampler needs before its
// rounded tokens agree with the ideal text on 99 % of positions, with and without anchor guidance.
// Shared by the drdiff-anchor-steps example and the anchor tests.
//
// Problem: the mixture of deltas (the ideal text denoiser over a random embedding table, uniform
// prior over V tokens) for P independent positions starting from the same Gaussian noise. The ideal
// text is the rounding of the exact denoiser's probability-flow solution (2M, 1000 steps; it agrees
// with 3M at 2000 steps on every position). The noisy problem perturbs the data prediction by a fixed
// smooth random field of size η·σ_t: x̂0 += η σ_t sin(W x_t + c) (a denoiser that errs most where the
// noise is high, like a trained network).

#include <drdiff/cpu/anchor.hpp>
#include <drdiff/cpu/solver.hpp>
#include <drdiff/solver/problems.hpp>

#include <cmath>
#include <random>
#include <vector>

namespace drdiff::study {

struct noisy_mixture {
  solver::mixture_of_deltas const* exact = nullptr;
  double eta = 0.0;
  std::vector<double> W, c;  // [d, d], [d]

  noisy_mixture(solver::mixture_of_deltas const& m, double e, unsigned seed)
      : exact(&m), eta(e), W(std::size_t(m.d) * m.d), c(std::size_t(m.d)) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> nd(0, 1);
    for (auto& w : W) w = nd(rng) / std::sqrt(double(m.d));
    for (auto& v : c) v = 6.283185307179586 * nd(rng);
  }
  void operator()(double const* x, double t, double* out) const {
    (*exact)(x, t, out);
    if (eta == 0.0) return;
    int const d = exact->d;
    double const s = eta * exact->ops.sigma(t);
    for (int p = 0; p < exact->P; ++p)
      for (int k = 0; k < d; ++k) {
        double z = c[k];
        for (int j = 0; j < d; ++j) z += W[std::size_t(k) * d + j] * x[std::size_t(p) * d + j];
        out[std::size_t(p) * d + k] += s * std::sin(z);
      }
  }
};

/// One configuration of the study.
struct setup {
  int order = 2;                    // 1 = DDIM, 2 = 2M
  bool guided = false;
  anchor::guidance_schedule schedule{};
};

class step_study {
 public:
  solver::mixture_of_deltas problem;
  std::vector<double> start;  // x_T, shared by every run
  double t_start = 1.0, t_end = 1e-3;

  step_study(int vocab, int dim, int positions, unsigned seed)
      : problem(vocab, dim, positions, seed), start(std::size_t(positions) * dim) {
    std::mt19937 rng(seed + 1);
    std::normal_distribution<double> nd(0, 1);
    for (auto& e : start) e = nd(rng);
  }
  anchor::token_shape shape() const { return {1, problem.P, problem.d}; }
  anchor::nearest_embedding<double> clamp() const { return {problem.E.data(), problem.V, problem.d}; }

  /// The rounded tokens of one solve.
  template <class Model>
  std::vector<int> tokens(Model const& model, setup const& s, int steps) const {
    context<cpu> const ctx{1};
    solver::dpmpp_config cfg;
    cfg.order = s.order;
    auto const grid = solver::make_grid(problem.ops, steps, solver::spacing::uniform_lambda, t_start, t_end);
    std::vector<double> x = start, ws(3 * x.size()), scratch(x.size());
    if (s.guided) {
      auto g = anchor::make_guidance(ctx, shape(), anchor::bind<double>(ctx, clamp(), shape()), s.schedule,
                                     problem.ops, scratch.data());
      solver::dpmpp_sample(ctx, problem.ops, cfg, grid, model, x.data(), x.size(), ws.data(), g);
    } else {
      solver::dpmpp_sample(ctx, problem.ops, cfg, grid, model, x.data(), x.size(), ws.data());
    }
    std::vector<int> ids(std::size_t(problem.P));
    anchor::round_to_nearest(ctx, clamp(), shape(), x.data(), ids.data());
    return ids;
  }
  /// The ideal text: the exact denoiser's flow, 2M with 1000 steps, rounded.
  std::vector<int> ideal() const { return tokens(problem, setup{}, 1000); }

  static double accuracy(std::vector<int> const& a, std::vector<int> const& b) {
    std::size_t same = 0;
    for (std::size_t i = 0; i < a.size(); ++i) same += a[i] == b[i];
    return double(same) / double(a.size());
  }
  /// The fewest steps (scanning 1, 2, …, max_steps) whose accuracy reaches `target`; 0 if none.
  template <class Model>
  int steps_needed(Model const& model, setup const& s, std::vector<int> const& ideal_ids, double target,
                   int max_steps) const {
    for (int n = 1; n <= max_steps; ++n)
      if (accuracy(tokens(model, s, n), ideal_ids) >= target) return n;
    return 0;
  }
};

/// The documented default: clamp to the nearest embedding with γ = 1 once λ ≥ 1.5 (the posterior
/// has settled on one token).
inline anchor::guidance_schedule late_clamp() {
  anchor::guidance_schedule s;
  s.lambda_min = 1.5;
  return s;
}
/// Guidance through the token decision: γ from 0 at λ = −1 to 1 at λ = 2.5.
inline anchor::guidance_schedule ramp_clamp() {
  anchor::guidance_schedule s;
  s.lambda_min = -1.0;
  s.lambda_max = 2.5;
  s.gamma_start = 0.0;
  s.gamma_end = 1.0;
  return s;
}

}  // namespace drdiff::study
