#pragma once
/// \file
/// Noise schedules of variance-preserving diffusion: q(x_t | x_0) = N(α_t x_0, σ_t² I), α² + σ² = 1,
/// λ_t = log(α_t / σ_t). Each schedule is a small type exposing log α(t) and its inverse t(log α);
/// schedule_ops<S> derives α, σ, λ and t(λ) in double with expm1/log1p. Host code: solvers compute
/// their coefficients here and apply them on either backend.

#include <drdiff/core/config.hpp>
#include <drdiff/core/error.hpp>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace solver {

inline constexpr double kPi = 3.14159265358979323846;

/// Linear VP-SDE (DDPM's continuous limit): β(t) = β0 + t(β1 − β0) on t ∈ [t_min, 1]. Closed-form
/// inverse.
struct vp_linear {
  double beta0 = 0.1, beta1 = 20.0;
  double t_min = 1e-4, t_max = 1.0;

  double log_alpha(double t) const { return -0.25 * t * t * (beta1 - beta0) - 0.5 * t * beta0; }
  /// t with log α(t) = la (la ≤ 0).
  double t_of_log_alpha(double la) const {
    double const d = beta1 - beta0;
    // −¼ d t² − ½ β0 t − la = 0 → t = (−β0 + sqrt(β0² − 4 d la)) / d  (stable form below)
    double const disc = beta0 * beta0 - 4.0 * d * la;
    return -4.0 * la / (beta0 + std::sqrt(disc));
  }
};

/// Cosine schedule (Nichol & Dhariwal): α_t = cos((t+s)/(1+s)·π/2) / cos(s/(1+s)·π/2). t_max is
/// clipped at 0.9946, where α would otherwise reach 0 (λ → −∞).
struct vp_cosine {
  double s = 0.008;
  double t_min = 1e-4, t_max = 0.9946;

  double log_alpha0() const { return std::log(std::cos(s / (1.0 + s) * kPi / 2.0)); }
  double log_alpha(double t) const { return std::log(std::cos((t + s) / (1.0 + s) * kPi / 2.0)) - log_alpha0(); }
  double t_of_log_alpha(double la) const {
    return 2.0 * (1.0 + s) / kPi * std::acos(std::exp(la + log_alpha0())) - s;
  }
};

/// The sqrt schedule of Diffusion-LM / DiffuSeq: ᾱ(t) = 1 − sqrt(t + δ), δ = 1e-4, t ∈ [0, 1].
struct vp_sqrt {
  double delta = 1e-4;
  double t_min = 0.0, t_max = 1.0;

  double log_alpha(double t) const { return 0.5 * std::log1p(-std::sqrt(t + delta)); }
  double t_of_log_alpha(double la) const {
    double const one_minus_abar = -std::expm1(2.0 * la);  // sqrt(t + δ)
    return one_minus_abar * one_minus_abar - delta;
  }
};

/// A tabulated discrete schedule: ᾱ_n for n = 0 .. T−1 at t_n = (n + 1)/T, piecewise linear in log α
/// between them (DPM-Solver's "discrete" schedule). λ is clipped at ≥ lambda_min (−5.1 by default)
/// by limiting t_max, since the last ᾱ of many tables is ≈ 0.
class vp_discrete {
 public:
  vp_discrete() = default;
  /// `alphas_cumprod` strictly decreasing in (0, 1].
  explicit vp_discrete(std::vector<double> alphas_cumprod, double lambda_min = -5.1) {
    std::size_t const n = alphas_cumprod.size();
    DRDIFF_CHECK(n >= 2, "vp_discrete: the table has ", n, " entries (need at least 2)");
    log_alpha_.resize(n);
    for (std::size_t i = 0; i < n; ++i) {
      double const a = alphas_cumprod[i];
      DRDIFF_CHECK(a > 0.0 && a <= 1.0, "vp_discrete: alphas_cumprod[", i, "] = ", a, " is outside (0, 1]");
      DRDIFF_CHECK(i == 0 || a < alphas_cumprod[i - 1], "vp_discrete: alphas_cumprod must decrease, but [", i - 1,
                   "] = ", alphas_cumprod[i - 1], " and [", i, "] = ", a);
      log_alpha_[i] = 0.5 * std::log(a);
    }
    t_min = 1.0 / double(n);
    t_max = 1.0;
    // Clip: the largest t whose λ is still ≥ lambda_min.
    double const la_min = -0.5 * std::log1p(std::exp(-2.0 * lambda_min));  // log α at λ = lambda_min
    if (log_alpha(t_max) < la_min) t_max = std::max(t_min, t_of_log_alpha(la_min));
  }
  double t_min = 0, t_max = 0;

  double log_alpha(double t) const {
    double const n = double(log_alpha_.size());
    double const x = t * n - 1.0;  // fractional index
    std::size_t i = x <= 0 ? 0 : std::min(std::size_t(x), log_alpha_.size() - 2);
    double const f = x - double(i);
    return log_alpha_[i] + f * (log_alpha_[i + 1] - log_alpha_[i]);
  }
  double t_of_log_alpha(double la) const {
    // log α decreases with the index: find the segment [i, i+1] holding la.
    std::size_t lo = 0, hi = log_alpha_.size() - 1;
    if (la >= log_alpha_[0]) hi = 1;
    while (hi - lo > 1) {
      std::size_t const mid = (lo + hi) / 2;
      if (log_alpha_[mid] >= la) lo = mid; else hi = mid;
    }
    double const f = (la - log_alpha_[lo]) / (log_alpha_[lo + 1] - log_alpha_[lo]);
    return (double(lo) + f + 1.0) / double(log_alpha_.size());
  }

 private:
  std::vector<double> log_alpha_;
};

/// α, σ, λ and t(λ) of any schedule, in double.
template <class S>
struct schedule_ops {
  S sched;

  double log_alpha(double t) const { return sched.log_alpha(t); }
  double alpha(double t) const { return std::exp(log_alpha(t)); }
  /// log σ = ½ log(1 − α²), without cancellation near α = 1.
  double log_sigma(double t) const { return 0.5 * std::log(-std::expm1(2.0 * log_alpha(t))); }
  double sigma(double t) const { return std::exp(log_sigma(t)); }
  double lambda(double t) const { return log_alpha(t) - log_sigma(t); }
  /// t with λ(t) = lam: log α = −½ log(1 + e^{−2λ}).
  double t_of_lambda(double lam) const {
    double const x = -2.0 * lam;
    double const softplus = x > 30 ? x + std::log1p(std::exp(-x)) : std::log1p(std::exp(x));
    return sched.t_of_log_alpha(-0.5 * softplus);
  }
  double t_min() const { return sched.t_min; }
  double t_max() const { return sched.t_max; }
  /// Throws drdiff::error when t is outside the schedule's range.
  void check_t(double t, char const* what) const {
    DRDIFF_CHECK(std::isfinite(t) && t >= sched.t_min - 1e-12 && t <= sched.t_max + 1e-12, "solver: ", what, " t = ",
                 t, " is outside the schedule's range [", sched.t_min, ", ", sched.t_max, "]");
  }
};

template <class S>
schedule_ops<S> ops(S const& s) {
  return schedule_ops<S>{s};
}

}  // namespace solver
DRDIFF_NAMESPACE_END
