#pragma once
/// \file
/// Anchor guidance and re-anchoring as solver hooks (host objects; the work runs on the backend of
/// their context).
///
/// - guidance: the `correct_x0` hook x̂0 ← x̂0 + γ·(P(x̂0) − x̂0) at chosen steps, where P is a bound
///   projector (anchor::bind in cpu/anchor.hpp or cuda/anchor.cuh) and γ follows a
///   guidance_schedule (a list of step indices and/or a λ range, γ linear in λ across the range).
/// - keep_clean: DiffuSeq's re-anchoring of source positions (prompt tokens stay at their clean
///   embeddings). As `correct_xt` it fixes the state after each update; as `correct_x0` it fixes
///   the data predictions the multistep history keeps.
/// - chain(h1, h2): one hook that runs h1 then h2 (guidance then keep_clean, for example).
/// - anchor_positions: the clean positions of a sequence, to hand to HSA as its global tokens.

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/attention/policy/global_tokens.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/core/traits.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/solver/noise_schedule.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {
/// x0 ← x0 + γ·(p − x0) on backend B; specialised in cpu/anchor.hpp and cuda/anchor.cuh.
template <class B>
struct anchor_blend_impl {
  static_assert(dependent_false<B>,
                "drdiff::anchor::guidance: no blend for this backend. For drdiff::cpu include <drdiff/cpu/anchor.hpp>; "
                "for drdiff::cuda include <drdiff/cuda/anchor.cuh> in a .cu file.");
};
/// x[token] = clean[token] for tokens whose target flag is 0, on backend B.
template <class B>
struct anchor_keep_impl {
  static_assert(dependent_false<B>,
                "drdiff::anchor::keep_clean: no implementation for this backend. For drdiff::cpu include "
                "<drdiff/cpu/anchor.hpp>; for drdiff::cuda include <drdiff/cuda/anchor.cuh> in a .cu file.");
};
}  // namespace detail

namespace anchor {

/// When guidance acts and how strongly. A call at (t, step) applies when `step` is in `steps` (or
/// `steps` is empty) and λ(t) ∈ [lambda_min, lambda_max]. γ is gamma_start at lambda_min and
/// gamma_end at lambda_max, linear in λ between them (constant gamma_start if the range is not
/// finite). γ ∈ [0, 1]: 0 leaves x̂0 alone, 1 replaces it by the anchor.
struct guidance_schedule {
  std::vector<int> steps;
  double lambda_min = -std::numeric_limits<double>::infinity();
  double lambda_max = std::numeric_limits<double>::infinity();
  double gamma_start = 1.0, gamma_end = 1.0;

  void validate() const {
    DRDIFF_CHECK(std::isfinite(gamma_start) && gamma_start >= 0.0 && gamma_start <= 1.0,
                 "guidance_schedule: gamma_start = ", gamma_start, " must be in [0, 1]");
    DRDIFF_CHECK(std::isfinite(gamma_end) && gamma_end >= 0.0 && gamma_end <= 1.0,
                 "guidance_schedule: gamma_end = ", gamma_end, " must be in [0, 1]");
    DRDIFF_CHECK(!std::isnan(lambda_min) && !std::isnan(lambda_max) && lambda_min <= lambda_max,
                 "guidance_schedule: lambda_min = ", lambda_min, " must be <= lambda_max = ", lambda_max);
    for (std::size_t i = 0; i < steps.size(); ++i)
      DRDIFF_CHECK(steps[i] >= 0, "guidance_schedule: steps[", i, "] = ", steps[i], " must be >= 0");
  }
  /// γ for a hook call (0 = not applied).
  double gamma(double lambda, int step) const {
    if (!steps.empty() && std::find(steps.begin(), steps.end(), step) == steps.end()) return 0.0;
    if (lambda < lambda_min || lambda > lambda_max) return 0.0;
    if (!std::isfinite(lambda_min) || !std::isfinite(lambda_max) || lambda_max == lambda_min) return gamma_start;
    double const u = (lambda - lambda_min) / (lambda_max - lambda_min);
    return gamma_start + u * (gamma_end - gamma_start);
  }
};

/// The correct_x0 hook of anchor guidance. `project(x, out)` is a bound projector (anchor::bind);
/// `scratch` holds shape.elements() values of T in the backend's memory (caller-owned).
template <class Backend, class T, class Project, class S>
class guidance {
 public:
  guidance(context<Backend> ctx, token_shape shape, Project project, guidance_schedule schedule,
           solver::schedule_ops<S> ops, T* scratch)
      : ctx_(ctx), shape_(shape), project_(std::move(project)), schedule_(std::move(schedule)), ops_(ops),
        scratch_(scratch) {
    shape_.validate("guidance");
    schedule_.validate();
    DRDIFF_CHECK(scratch_ != nullptr, "guidance: scratch is a null pointer (it needs ", shape_.elements(), " values)");
  }

  void operator()(T* x0, double t, int step) {
    double const g = schedule_.gamma(ops_.lambda(t), step);
    last_gamma_ = g;
    if (g == 0.0) return;
    ++applied_;
    project_(static_cast<T const*>(x0), scratch_);
    drdiff::detail::anchor_blend_impl<Backend>::run(ctx_, x0, static_cast<T const*>(scratch_), g,
                                                    std::size_t(shape_.elements()));
  }
  /// Calls that applied guidance so far, and the γ of the latest call.
  int applied() const noexcept { return applied_; }
  double last_gamma() const noexcept { return last_gamma_; }
  guidance_schedule const& schedule() const noexcept { return schedule_; }

 private:
  context<Backend> ctx_;
  token_shape shape_;
  Project project_;
  guidance_schedule schedule_;
  solver::schedule_ops<S> ops_;
  T* scratch_;
  int applied_ = 0;
  double last_gamma_ = 0.0;
};

template <class Backend, class T, class Project, class S>
guidance<Backend, T, Project, S> make_guidance(context<Backend> ctx, token_shape shape, Project project,
                                               guidance_schedule schedule, solver::schedule_ops<S> ops, T* scratch) {
  return guidance<Backend, T, Project, S>(ctx, shape, std::move(project), std::move(schedule), ops, scratch);
}

/// Re-anchoring: tokens whose `target` flag is 0 are reset to `clean` (both in the backend's memory,
/// [batch, seq] flags and [batch, seq, dim] values). Usable as correct_xt (x, t, step) and as
/// correct_x0 (x0, t[, step]).
template <class Backend, class T>
struct keep_clean {
  context<Backend> ctx{};
  token_shape shape{};
  unsigned char const* target = nullptr;
  T const* clean = nullptr;

  keep_clean(context<Backend> c, token_shape s, unsigned char const* tgt, T const* cl)
      : ctx(c), shape(s), target(tgt), clean(cl) {
    shape.validate("keep_clean");
    DRDIFF_CHECK(target != nullptr, "keep_clean: target is a null pointer");
    DRDIFF_CHECK(clean != nullptr, "keep_clean: clean is a null pointer");
  }
  void operator()(T* x, double /*t*/, int /*step*/ = 0) const {
    drdiff::detail::anchor_keep_impl<Backend>::run(ctx, x, clean, target, shape);
  }
};

/// One hook that runs `first` then `second` with the same arguments.
template <class H1, class H2>
struct chained {
  H1 first;
  H2 second;
  template <class X>
  void operator()(X* x, double t, int step) {
    call(first, x, t, step);
    call(second, x, t, step);
  }

 private:
  template <class H, class X>
  static void call(H& h, X* x, double t, int step) {
    if constexpr (std::is_invocable_v<H&, X*, double, int>) h(x, t, step);
    else h(x, t);
  }
};
template <class H1, class H2>
chained<H1, H2> chain(H1 first, H2 second) {
  return {std::move(first), std::move(second)};
}

/// The positions of one sequence whose target flag is 0 (the clean, anchored tokens), ascending:
/// hand them to attention as global tokens with `as_global_tokens`.
inline std::vector<int> anchor_positions(unsigned char const* target, int seq) {
  DRDIFF_CHECK(seq > 0, "anchor_positions: seq = ", seq, " must be > 0");
  DRDIFF_CHECK(target != nullptr, "anchor_positions: target is a null pointer");
  std::vector<int> p;
  for (int i = 0; i < seq; ++i)
    if (target[i] == 0) p.push_back(i);
  return p;
}
/// A global-token policy over `positions` (which must outlive the policy: it keeps a pointer).
inline attn::global_tokens as_global_tokens(std::vector<int> const& positions) {
  return attn::global_tokens::explicit_list(positions.data(), int(positions.size()));
}

}  // namespace anchor
DRDIFF_NAMESPACE_END
