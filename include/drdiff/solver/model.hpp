#pragma once
/// \file
/// Model adapters: DPM-Solver++ consumes data predictions x̂0. A model is a callable
/// `model(T const* x, double t, T* out)` over a state of n values; these wrap ε- and v-prediction
/// models into x̂0 models with the schedule's α_t, σ_t (computed once per call, in double).

#include <drdiff/solver/noise_schedule.hpp>

#include <cstddef>
#include <type_traits>
#include <vector>
#include <utility>

DRDIFF_NAMESPACE_BEGIN
namespace solver {

/// x̂0 = (x − σ_t ε) / α_t.
template <class S, class Eps>
auto from_eps(schedule_ops<S> ops, Eps eps, std::size_t n) {
  return [ops, eps = std::move(eps), n](auto const* x, double t, auto* out) {
    eps(x, t, out);
    double const a = ops.alpha(t), s = ops.sigma(t);
    for (std::size_t i = 0; i < n; ++i) out[i] = (x[i] - s * out[i]) / a;
  };
}

/// x̂0 = α_t x − σ_t v.
template <class S, class V>
auto from_v(schedule_ops<S> ops, V v, std::size_t n) {
  return [ops, v = std::move(v), n](auto const* x, double t, auto* out) {
    v(x, t, out);
    double const a = ops.alpha(t), s = ops.sigma(t);
    for (std::size_t i = 0; i < n; ++i) out[i] = a * x[i] - s * out[i];
  };
}

/// A hook that does nothing (the default for correct_x0 / correct_xt).
struct no_hook {
  template <class... A>
  void operator()(A&&...) const noexcept {}
};

/// Calls a correct_x0 hook: with (x0, t, step) when it takes the step index (anchor guidance at
/// chosen steps), else with (x0, t).
template <class H, class X>
void call_x0_hook(H& hook, X* x0, double t, int step) {
  if constexpr (std::is_invocable_v<H&, X*, double, int>) hook(x0, t, step);
  else hook(x0, t);
}

/// The multistep loop both backends run: the newest data prediction goes to m[0] and the older ones
/// move down (pointer rotation, no copies); each step calls the model, the x̂0 hook, `check(x0, step)`
/// (the backend's finiteness check), `step_update(k, x, m0, m1, m2, step)` and the x_t hook.
template <class T, class Coefficients, class Model, class X0Hook, class XtHook, class Check, class Update>
void multistep_loop(Coefficients const& plan, std::vector<double> const& grid, Model& model, T* x, T* const (&ws)[3],
                    X0Hook& correct_x0, XtHook& correct_xt, Check&& check, Update&& step_update) {
  T* m[3] = {ws[0], ws[1], ws[2]};
  for (std::size_t s = 0; s < plan.size(); ++s) {
    T* const fresh = m[2];
    m[2] = m[1];
    m[1] = m[0];
    m[0] = fresh;
    model(static_cast<T const*>(x), grid[s], m[0]);
    call_x0_hook(correct_x0, m[0], grid[s], int(s));
    check(static_cast<T const*>(m[0]), int(s));
    step_update(plan[s], x, m[0], m[1], m[2], int(s));
    correct_xt(x, grid[s + 1], int(s));
  }
}

}  // namespace solver
DRDIFF_NAMESPACE_END
