#pragma once
/// \file
/// CPU side of the solvers: the fused state update (one Eigen pass over the state) and the
/// DPM-Solver++ sampling loop with its hooks.

#include <drdiff/core/backend.hpp>
#include <drdiff/cpu/detail/parallel.hpp>
#include <drdiff/solver/dpmpp.hpp>
#include <drdiff/solver/model.hpp>
#include <drdiff/solver/noise.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace solver {

/// x ← a·x + b0·m0 + b1·m1 + b2·m2 + c·z: one pass over the state. Terms whose coefficient is 0 are
/// not read; z(step, i) comes from the counter-based noise source (the same numbers as on the GPU).
template <class T>
void update(context<cpu> const& ctx, step_coefficients const& k, T* x, T const* m0, T const* m1, T const* m2,
            std::size_t n, gaussian_noise const& noise = {}, int step = 0) {
  using arr = Eigen::Array<T, Eigen::Dynamic, 1>;
  std::int64_t const chunk = 1 << 16;
  std::int64_t const pieces = (std::int64_t(n) + chunk - 1) / chunk;
  drdiff::detail::parallel_for(pieces > 1 ? drdiff::detail::resolve_threads(ctx.num_threads) : 1, pieces,
                               [&](std::int64_t p, int) {
    std::size_t const off = std::size_t(p) * chunk, len = std::min<std::size_t>(chunk, n - off);
    Eigen::Map<arr> xs(x + off, len);
    auto map = [&](T const* v) { return Eigen::Map<arr const>(v + off, len); };
    T const a = T(k.a), b0 = T(k.b[0]), b1 = T(k.b[1]), b2 = T(k.b[2]);
    bool const use1 = k.b[1] != 0, use2 = k.b[2] != 0;
    if (use1 && use2) xs = a * xs + b0 * map(m0) + b1 * map(m1) + b2 * map(m2);
    else if (use1) xs = a * xs + b0 * map(m0) + b1 * map(m1);
    else if (use2) xs = a * xs + b0 * map(m0) + b2 * map(m2);
    else xs = a * xs + b0 * map(m0);
    if (k.c != 0) {  // pieces start at even indices: draw the Box–Muller pairs once
      for (std::size_t i = 0; i < len; i += 2) {
        double z0 = 0, z1 = 0;
        noise.pair(step, (off + i) >> 1, z0, z1);
        x[off + i] += T(k.c * z0);
        if (i + 1 < len) x[off + i + 1] += T(k.c * z1);
      }
    }
  });
}

/// DPM-Solver++(2S): two model evaluations per step (at s and at the λ-midpoint); the last step of a
/// grid with final_to_zero is x ← x̂0(x_s). Workspace: 3·n values.
template <class T, class S, class Model, class X0Hook, class XtHook>
void dpmpp_2s_sample(context<cpu> const& ctx, schedule_ops<S> const& ops, dpmpp_config const& cfg,
                     std::vector<double> const& grid, Model&& model, T* x, std::size_t n, T* workspace,
                     X0Hook&& correct_x0, XtHook&& correct_xt) {
  T* const ms = workspace;          // x̂0 at s
  T* const u = workspace + n;       // the intermediate state
  T* const mu = workspace + 2 * n;  // x̂0 at the midpoint
  int const steps = int(grid.size()) - 1;
  for (int s = 0; s < steps; ++s) {
    model(static_cast<T const*>(x), grid[s], ms);
    call_x0_hook(correct_x0, ms, grid[s], s);
    if (s == steps - 1 && cfg.final_to_zero) {
      std::copy(ms, ms + n, x);
    } else {
      auto const k = dpmpp_2s_coefficients(ops, grid[s], grid[s + 1]);
      std::copy(x, x + n, u);
      update(ctx, k.stage1, u, ms, ms, ms, n);
      model(static_cast<T const*>(u), k.t_mid, mu);
      call_x0_hook(correct_x0, mu, k.t_mid, s);
      update(ctx, k.stage2, x, ms, ms, mu, n);
    }
    for (std::size_t i = 0; i < n; ++i)
      DRDIFF_CHECK(std::isfinite(double(x[i])), "dpmpp_sample: the state x[", i, "] = ", double(x[i]),
                   " is not finite (step ", s, ")");
    correct_xt(x, grid[s + 1], s);
  }
}

/// Runs DPM-Solver++ from grid.front() to grid.back() on the state x (n values, in place).
/// `model(x, t, x0)` writes the data prediction; `correct_x0(x0, t)` or `correct_x0(x0, t, step)` may
/// change it (thresholding, anchor guidance; 2S calls it at s and at the midpoint of step s); `correct_xt(x, t, step)` may change the state after each step (keeping
/// conditioning positions clean). `workspace` holds 3·n values (the last three predictions). With
/// cfg.sde, `noise` draws the fresh Gaussian of each step (seeded, backend-independent).
/// Throws drdiff::error on bad settings, a bad grid, or a NaN in the state or a prediction.
template <class T, class S, class Model, class X0Hook = no_hook, class XtHook = no_hook>
void dpmpp_sample(context<cpu> const& ctx, schedule_ops<S> const& ops, dpmpp_config const& cfg,
                  std::vector<double> const& grid, Model&& model, T* x, std::size_t n, T* workspace,
                  X0Hook&& correct_x0 = {}, XtHook&& correct_xt = {}, gaussian_noise const& noise = {}) {
  auto const plan = dpmpp_plan(ops, cfg, grid);
  DRDIFF_CHECK(x != nullptr && workspace != nullptr, "dpmpp_sample: x or workspace is a null pointer");
  if (cfg.singlestep) {
    dpmpp_2s_sample(ctx, ops, cfg, grid, model, x, n, workspace, correct_x0, correct_xt);
    return;
  }
  auto check_finite = [n](T const* v, char const* what, int step) {
    for (std::size_t i = 0; i < n; ++i)
      DRDIFF_CHECK(std::isfinite(double(v[i])), "dpmpp_sample: ", what, "[", i, "] = ", double(v[i]),
                   " is not finite (step ", step, ")");
  };
  check_finite(x, "the state x", 0);
  T* const m[3] = {workspace, workspace + n, workspace + 2 * n};
  multistep_loop(plan, grid, model, x, m, correct_x0, correct_xt,
                 [&](T const* x0, int s) { check_finite(x0, "the data prediction", s); },
                 [&](step_coefficients const& k, T* xs, T const* m0, T const* m1, T const* m2, int s) {
                   update(ctx, k, xs, m0, m1, m2, n, noise, s);
                 });
}

}  // namespace solver
DRDIFF_NAMESPACE_END
