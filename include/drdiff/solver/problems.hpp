#pragma once
/// \file
/// Diffusion problems whose exact answer is known, for validating solvers and their settings
/// (shared/notes/solvers_and_routing.md §6). Host code, double precision.
///
/// - gaussian_problem: data N(μ, s²); the ideal denoiser and the exact probability-flow solution.
/// - mixture_of_deltas: data are the rows of an embedding table (the ideal text denoiser).

#include <drdiff/core/backend.hpp>
#include <drdiff/solver/grid.hpp>
#include <drdiff/solver/noise_schedule.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <random>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace solver {

/// Gaussian data N(mu, s²) under the linear VP schedule.
struct gaussian_problem {
  double mu = 0.7, s = 0.5;
  schedule_ops<vp_linear> ops{};

  /// The ideal data prediction for a state of n values.
  void operator()(double const* x, double t, double* out, std::size_t n) const {
    double const a = ops.alpha(t), sg = ops.sigma(t);
    double const gain = a * s * s / (a * a * s * s + sg * sg);
    for (std::size_t i = 0; i < n; ++i) out[i] = mu + gain * (x[i] - a * mu);
  }
  /// The exact ODE solution at t of the trajectory through x_start at t_start.
  double exact(double x_start, double t_start, double t) const {
    auto sd = [&](double u) {
      double const a = ops.alpha(u), sg = ops.sigma(u);
      return std::sqrt(a * a * s * s + sg * sg);
    };
    return ops.alpha(t) * mu + sd(t) * (x_start - ops.alpha(t_start) * mu) / sd(t_start);
  }
};

/// The ideal text denoiser: data are the V rows of an embedding table E (d columns, uniform prior);
/// x̂0(x_t) = Σ_v softmax_v(−‖x_t − α_t E_v‖² / 2σ_t²) E_v, for P points of dimension d.
struct mixture_of_deltas {
  int V = 0, d = 0, P = 0;
  std::vector<double> E;
  schedule_ops<vp_linear> ops{};

  mixture_of_deltas(int v, int dim, int points, unsigned seed) : V(v), d(dim), P(points), E(std::size_t(v) * dim) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> nd(0, 1);
    for (auto& e : E) e = nd(rng);
  }
  void operator()(double const* x, double t, double* out) const {
    double const a = ops.alpha(t), s = ops.sigma(t);
    std::vector<double> w(static_cast<std::size_t>(V));
    for (int p = 0; p < P; ++p) {
      double mx = -INFINITY;
      for (int v = 0; v < V; ++v) {
        double q = 0;
        for (int k = 0; k < d; ++k) {
          double const df = x[p * d + k] - a * E[std::size_t(v) * d + k];
          q += df * df;
        }
        w[v] = -q / (2 * s * s);
        mx = std::max(mx, w[v]);
      }
      double z = 0;
      for (auto& e : w) z += (e = std::exp(e - mx));
      for (int k = 0; k < d; ++k) {
        double o = 0;
        for (int v = 0; v < V; ++v) o += w[v] * E[std::size_t(v) * d + k];
        out[p * d + k] = o / z;
      }
    }
  }
};

/// Root-mean-square difference of two states.
inline double rms_diff(std::vector<double> const& a, std::vector<double> const& b) {
  double e = 0;
  for (std::size_t i = 0; i < a.size(); ++i) e += (a[i] - b[i]) * (a[i] - b[i]);
  return std::sqrt(e / double(a.size()));
}

}  // namespace solver
DRDIFF_NAMESPACE_END
