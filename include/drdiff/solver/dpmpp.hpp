#pragma once
/// \file
/// DPM-Solver++ multistep (data prediction) for VP diffusion: per-step coefficients computed on the
/// host in double with expm1, so that every backend applies one fused pass
/// x ← a·x + b0·m0 + b1·m1 + b2·m2 (m0 the newest data prediction). Order 1 is DDIM; order 2 the
/// midpoint ("dpmsolver++") or Heun ("taylor") form; order 3 the published form (global order 2, as in
/// the DPM-Solver repository, diffusers and k-diffusion) or the Taylor-consistent form (doubled φ3
/// coefficient, order 3). See docs and shared/notes/solvers_and_routing.md §2.

#include <drdiff/solver/grid.hpp>
#include <drdiff/solver/noise_schedule.hpp>

#include <cmath>
#include <limits>

DRDIFF_NAMESPACE_BEGIN
namespace solver {

enum class second_order { midpoint, heun };
enum class third_order { published, taylor };

/// What DPM-Solver++ runs. Warm-up: step i uses order min(order, i + 1).
struct dpmpp_config {
  int order = 2;                                   ///< 1 (DDIM), 2 or 3
  second_order second = second_order::midpoint;
  third_order third = third_order::taylor;
  bool lower_order_final = true;                   ///< with fewer than `lower_order_final_below` steps,
  int lower_order_final_below = 15;                ///<   the last steps drop to order steps − i
  bool final_to_zero = false;                      ///< the last step goes to σ = 0: x ← x̂0 (no log 0)
  bool sde = false;                                ///< SDE-DPM-Solver++ (orders 1, 2): fresh noise each step
  bool singlestep = false;                         ///< DPM-Solver++(2S): order 2, two evaluations per step

  void validate() const {
    DRDIFF_CHECK(order >= 1 && order <= 3, "dpmpp: order = ", order, " must be 1, 2 or 3");
    DRDIFF_CHECK(!sde || order <= 2, "dpmpp: the SDE solver has orders 1 and 2, not order = ", order);
    DRDIFF_CHECK(!singlestep || (order == 2 && !sde), "dpmpp: the singlestep solver is 2S (order = 2, ODE), not order = ",
                 order, sde ? " with sde" : "");
    DRDIFF_CHECK(lower_order_final_below >= 0, "dpmpp: lower_order_final_below = ", lower_order_final_below,
                 " must be >= 0");
  }
};

/// x_next = a·x + b[0]·m0 + b[1]·m1 + b[2]·m2 + c·z.
struct step_coefficients {
  double a = 0.0;
  double b[3] = {0.0, 0.0, 0.0};
  double c = 0.0;
  int order = 1;
};

/// Coefficients of a step from s to t of the given order; s1, s2 are the earlier nodes whose data
/// predictions are m1, m2 (unused below order 2 / 3).
template <class S>
step_coefficients dpmpp_coefficients(schedule_ops<S> const& ops, dpmpp_config const& cfg, int order, double s,
                                     double t, double s1 = std::numeric_limits<double>::quiet_NaN(),
                                     double s2 = std::numeric_limits<double>::quiet_NaN()) {
  step_coefficients k;
  k.order = order;
  double const ls = ops.lambda(s), lt = ops.lambda(t), h = lt - ls;
  DRDIFF_CHECK(h > 0, "dpmpp: a step must increase lambda, but lambda(s = ", s, ") = ", ls, " and lambda(t = ", t,
               ") = ", lt);
  double const alpha = ops.alpha(t);
  k.a = std::exp(ops.log_sigma(t) - ops.log_sigma(s));
  if (cfg.sde) {  // x ← (σ_t/σ_s)e^{−h} x + α_t(1 − e^{−2h}) m0 (+ order-2 term) + σ_t sqrt(1 − e^{−2h}) z
    double const e2 = -std::expm1(-2.0 * h);
    k.a *= std::exp(-h);
    k.c = ops.sigma(t) * std::sqrt(e2);
    k.b[0] = alpha * e2;
    if (order >= 2) {
      double const r0 = (ls - ops.lambda(s1)) / h;
      double const w = cfg.second == second_order::midpoint ? 0.5 * e2 : e2 / (-2.0 * h) + 1.0;
      k.b[0] += alpha * w / r0;
      k.b[1] = -alpha * w / r0;
    }
    return k;
  }
  double const phi1 = std::expm1(-h), phi2 = phi1 / h + 1.0, phi3 = phi2 / h - 0.5;
  if (order == 1) {
    k.b[0] = -alpha * phi1;
    return k;
  }
  double const r0 = (ls - ops.lambda(s1)) / h;
  if (order == 2) {
    if (cfg.second == second_order::midpoint) {  // − α φ1 m0 − ½ α φ1 (m0 − m1)/r0
      k.b[0] = -alpha * phi1 - 0.5 * alpha * phi1 / r0;
      k.b[1] = 0.5 * alpha * phi1 / r0;
    } else {  // − α φ1 m0 + α φ2 (m0 − m1)/r0
      k.b[0] = -alpha * phi1 + alpha * phi2 / r0;
      k.b[1] = -alpha * phi2 / r0;
    }
    return k;
  }
  double const r1 = (ops.lambda(s1) - ops.lambda(s2)) / h;
  // D1⁰ = (m0 − m1)/r0, D1¹ = (m1 − m2)/r1; D1 = D1⁰ + r0/(r0+r1)(D1⁰ − D1¹); D2 = (D1⁰ − D1¹)/(r0+r1)
  double const d10[3] = {1.0 / r0, -1.0 / r0, 0.0};
  double const diff[3] = {1.0 / r0, -1.0 / r0 - 1.0 / r1, 1.0 / r1};
  double const w = cfg.third == third_order::taylor ? 2.0 : 1.0;
  for (int j = 0; j < 3; ++j) {
    double const d1 = d10[j] + r0 / (r0 + r1) * diff[j];
    double const d2 = diff[j] / (r0 + r1);
    k.b[j] = alpha * phi2 * d1 - w * alpha * phi3 * d2;
  }
  k.b[0] += -alpha * phi1;
  return k;
}

/// The two stages of a DPM-Solver++(2S) step from s to t with the intermediate node at
/// λ_s + r1·h (r1 = ½): u = a1·x + b1·m_s, then x ← a·x + b0·m_s + b2·m_u ("dpmsolver++" form:
/// D = (1 − 1/(2r1))·m_s + 1/(2r1)·m_u).
struct singlestep_coefficients {
  double t_mid = 0;
  step_coefficients stage1, stage2;
};
template <class S>
singlestep_coefficients dpmpp_2s_coefficients(schedule_ops<S> const& ops, double s, double t, double r1 = 0.5) {
  double const ls = ops.lambda(s), lt = ops.lambda(t), h = lt - ls;
  DRDIFF_CHECK(h > 0, "dpmpp: a step must increase lambda, but lambda(s = ", s, ") = ", ls, " and lambda(t = ", t,
               ") = ", lt);
  singlestep_coefficients k;
  k.t_mid = ops.t_of_lambda(ls + r1 * h);
  k.stage1.a = std::exp(ops.log_sigma(k.t_mid) - ops.log_sigma(s));
  k.stage1.b[0] = -ops.alpha(k.t_mid) * std::expm1(-r1 * h);
  double const at = ops.alpha(t), phi1 = std::expm1(-h);
  k.stage2.order = 2;
  k.stage2.a = std::exp(ops.log_sigma(t) - ops.log_sigma(s));
  k.stage2.b[0] = -at * phi1 * (1.0 - 0.5 / r1);
  k.stage2.b[2] = -at * phi1 * (0.5 / r1);
  return k;
}

/// The order of step i of `steps` under cfg (warm-up and lower_order_final).
inline int dpmpp_step_order(dpmpp_config const& cfg, int i, int steps) {
  int o = std::min(cfg.order, i + 1);
  if (cfg.lower_order_final && steps < cfg.lower_order_final_below) o = std::min(o, steps - i);
  return std::max(o, 1);
}

/// The coefficients of every step of a grid (host side; apply them with a backend's update).
template <class S>
std::vector<step_coefficients> dpmpp_plan(schedule_ops<S> const& ops, dpmpp_config const& cfg,
                                          std::vector<double> const& grid) {
  cfg.validate();
  check_grid(ops, grid);
  int const steps = int(grid.size()) - 1;
  std::vector<step_coefficients> plan(steps);
  for (int i = 0; i < steps; ++i) {
    if (i == steps - 1 && cfg.final_to_zero) {  // σ_t = 0: x ← x̂0(x_s), no λ = ∞ anywhere
      plan[i].b[0] = 1.0;
      continue;
    }
    int const o = dpmpp_step_order(cfg, i, steps);
    plan[i] = dpmpp_coefficients(ops, cfg, o, grid[i], grid[i + 1], i >= 1 ? grid[i - 1] : 0.0,
                                 i >= 2 ? grid[i - 2] : 0.0);
  }
  return plan;
}

}  // namespace solver
DRDIFF_NAMESPACE_END
