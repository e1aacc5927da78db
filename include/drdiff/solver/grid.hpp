#pragma once
/// \file
/// Time grids for sampling: from t_start (noise) down to t_end, strictly decreasing. Uniform in λ,
/// uniform in t, quadratic in t, Karras ρ-spacing in σ/α, or a custom list (checked).

#include <drdiff/solver/noise_schedule.hpp>

#include <cmath>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace solver {

enum class spacing { uniform_lambda, uniform_t, quadratic_t, karras };

/// Throws drdiff::error unless `grid` has at least 2 points, is strictly decreasing (no duplicates)
/// and lies in the schedule's range.
template <class S>
void check_grid(schedule_ops<S> const& ops, std::vector<double> const& grid) {
  DRDIFF_CHECK(grid.size() >= 2, "solver: a time grid needs at least 2 points (1 step), got ", grid.size());
  for (std::size_t i = 0; i < grid.size(); ++i) {
    ops.check_t(grid[i], "grid");
    if (i > 0)
      DRDIFF_CHECK(grid[i] < grid[i - 1], "solver: the time grid must be strictly decreasing, but t[", i - 1, "] = ",
                   grid[i - 1], " and t[", i, "] = ", grid[i], grid[i] == grid[i - 1] ? " (a duplicate)" : "");
  }
}

/// `steps` + 1 times from t_start to t_end with the given spacing (Karras uses ρ = `rho`).
template <class S>
std::vector<double> make_grid(schedule_ops<S> const& ops, int steps, spacing sp, double t_start, double t_end,
                              double rho = 7.0) {
  DRDIFF_CHECK(steps >= 1, "solver: steps = ", steps, " must be >= 1");
  ops.check_t(t_start, "t_start");
  ops.check_t(t_end, "t_end");
  DRDIFF_CHECK(t_end < t_start, "solver: t_end = ", t_end, " must be below t_start = ", t_start);
  std::vector<double> g(std::size_t(steps) + 1);
  for (int i = 0; i <= steps; ++i) {
    double const u = double(i) / steps;
    switch (sp) {
      case spacing::uniform_t: g[i] = t_start + u * (t_end - t_start); break;
      case spacing::quadratic_t: {
        double const r = std::sqrt(t_start) + u * (std::sqrt(t_end) - std::sqrt(t_start));
        g[i] = r * r;
        break;
      }
      case spacing::karras: {  // σ/α = e^{−λ}, interpolated in σ^{1/ρ}
        DRDIFF_CHECK(rho > 0, "solver: Karras rho = ", rho, " must be > 0");
        double const s0 = std::pow(std::exp(-ops.lambda(t_start)), 1.0 / rho);
        double const s1 = std::pow(std::exp(-ops.lambda(t_end)), 1.0 / rho);
        g[i] = ops.t_of_lambda(-std::log(std::pow(s0 + u * (s1 - s0), rho)));
        break;
      }
      default: {
        double const l0 = ops.lambda(t_start), l1 = ops.lambda(t_end);
        g[i] = ops.t_of_lambda(l0 + u * (l1 - l0));
      }
    }
  }
  g.front() = t_start;  // exact ends (inverse schedules round)
  g.back() = t_end;
  check_grid(ops, g);
  return g;
}

}  // namespace solver
DRDIFF_NAMESPACE_END
