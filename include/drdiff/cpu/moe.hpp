#pragma once
/// \file
/// The CPU backend of router::moe_forward (router/moe.hpp), a routed mixture-of-experts FFN: router
/// GEMM → per-token router functor → dropless dispatch by counting sort → per-expert GEMMs (Eigen) on
/// gathered rows → combine in a fixed order (into `out`, or added to the fp32 `residual`).
/// A token's output is Σ_j w_j · FFN_{e_j}(x) summed in its selection order, so it does not depend on
/// thread timing; rows of one expert are computed together, so other tokens of the batch only enter
/// through GEMM blocking (agreement to rounding, see the tests).

#include <drdiff/core/backend.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/cpu/detail/parallel.hpp>
#include <drdiff/router/moe.hpp>
#include <drdiff/router/routers.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace router {

/// The routing decision of a batch: up to `width` (expert, weight) pairs per token.
struct routing {
  int width = 0;
  std::vector<int> count, expert;
  std::vector<float> weight;
  std::vector<int> offsets;  ///< [experts + 1]: rows of expert e are slots offsets[e] .. offsets[e+1]
  std::vector<int> slot_entry;  ///< slot → token·width + j (grouped by expert, tokens in order)
  std::vector<int> entry_slot;  ///< token·width + j → slot
  int dropped = 0;              ///< selections the capacity limit dropped
};

}  // namespace router

namespace detail {
inline float moe_gelu(float v) { return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f)); }
inline float moe_silu(float v) { return v / (1.f + std::exp(-v)); }

/// Fills rt.slot_entry / rt.entry_slot from rt.offsets: each expert's selections in token order
/// (the stable scatter of the counting sort). Entries with expert −1 (dropped) get no slot.
inline void moe_scatter_slots(router::routing& rt, int tokens, int experts) {
  std::vector<int> next(rt.offsets.begin(), rt.offsets.begin() + experts);
  rt.slot_entry.assign(rt.offsets[experts], 0);
  rt.entry_slot.assign(std::size_t(tokens) * rt.width, -1);
  for (int t = 0; t < tokens; ++t)
    for (int j = 0; j < rt.count[t]; ++j) {
      int const entry = t * rt.width + j;
      if (rt.expert[entry] < 0) continue;
      int const slot = next[rt.expert[entry]]++;
      rt.slot_entry[slot] = entry;
      rt.entry_slot[entry] = slot;
    }
}
}  // namespace detail

namespace router {

/// Routes every token (logits from the router GEMM) and groups the selections by expert (counting
/// sort: histogram, exclusive scan, stable scatter). Non-finite logits are an error.
template <class Router>
routing route(context<cpu> const& ctx, Router const& r, moe_args<float> const& a, moe_stats* stats = nullptr) {
  drdiff::detail::check_moe_args(a);
  r.validate(a.experts);
  int const T = a.tokens, E = a.experts, d = a.d_model;
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<mat const> x(a.x, T, d), w(a.w_router, E, d);
  mat logits = x * w.transpose();  // (T, E)
  if (a.b_router) logits.rowwise() += Eigen::Map<Eigen::RowVectorXf const>(a.b_router, E);

  routing rt;
  rt.width = r.max_selected(E);
  rt.count.assign(T, 0);
  rt.expert.assign(std::size_t(T) * rt.width, -1);
  rt.weight.assign(std::size_t(T) * rt.width, 0.f);
  std::vector<double> lse(T), top1(T);
  std::vector<float> probs(stats ? std::size_t(T) * E : 0);  // kept for the statistics only
  int const threads = drdiff::detail::resolve_threads(ctx.num_threads);
  drdiff::detail::parallel_for(threads, T, [&](std::int64_t t, int) {
    float const* z = logits.data() + t * E;
    for (int e = 0; e < E; ++e)
      DRDIFF_CHECK(std::isfinite(z[e]), "moe: router logit [token ", t, ", expert ", e, "] = ", z[e], " is not finite");
    token_info info;
    info.token = int(t);
    info.timestep = a.timestep;
    info.score = a.maybe_token_scores ? a.maybe_token_scores[t] : 0.f;
    rt.count[t] = r(z, E, info, rt.expert.data() + t * rt.width, rt.weight.data() + t * rt.width);
    float local[max_experts];
    float* const p = stats ? probs.data() + t * E : local;
    lse[t] = router::detail::softmax(z, E, p);
    int best = 0;
    for (int e = 1; e < E; ++e) best = p[e] > p[best] ? e : best;
    top1[t] = best;
  });
  // Counting sort of the selections by expert, stable in token order.
  rt.offsets.assign(E + 1, 0);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < rt.count[t]; ++j) ++rt.offsets[rt.expert[std::size_t(t) * rt.width + j] + 1];
  for (int e = 0; e < E; ++e) rt.offsets[e + 1] += rt.offsets[e];
  int dropped = 0;
  if (a.capacity_factor > 0.f) {  // keep the first `cap` selections of each expert, in token order
    int const cap = int(std::ceil(double(a.capacity_factor) * T * rt.width / E));
    std::vector<int> kept(E, 0);
    for (int t = 0; t < T; ++t)
      for (int j = 0; j < rt.count[t]; ++j) {
        int const entry = t * rt.width + j, e = rt.expert[entry];
        if (kept[e] < cap) {
          ++kept[e];
        } else {
          rt.weight[entry] = 0.f;
          rt.expert[entry] = -1;  // dropped: contributes nothing (the residual carries the token)
          ++dropped;
        }
      }
    for (int e = 0; e < E; ++e) rt.offsets[e + 1] = rt.offsets[e] + kept[e];
  }
  drdiff::detail::moe_scatter_slots(rt, T, E);
  if (stats) {
    stats->tokens_per_expert.assign(E, 0);
    for (int e = 0; e < E; ++e) stats->tokens_per_expert[e] = rt.offsets[e + 1] - rt.offsets[e];
    double active = 0, z2 = 0;
    std::vector<double> f(E, 0.0), P(E, 0.0);
    for (int t = 0; t < T; ++t) {
      active += rt.count[t];
      z2 += lse[t] * lse[t];
      f[int(top1[t])] += 1.0;
      for (int e = 0; e < E; ++e) P[e] += probs[std::size_t(t) * E + e];
    }
    double loss = 0;
    for (int e = 0; e < E; ++e) loss += (f[e] / std::max(T, 1)) * (P[e] / std::max(T, 1));
    stats->mean_active = T ? active / T : 0.0;
    stats->z_loss = T ? z2 / T : 0.0;
    stats->balance_loss = E * loss;
    stats->dropped = dropped;
  }
  rt.dropped = dropped;
  return rt;
}

/// Runs the experts of a routing decision and combines: out[t] = Σ_j w_{t,j} · FFN_{e_{t,j}}(x[t]) +
/// Σ_s FFN_shared_s(x[t]), each token's terms summed in its selection order.
inline void moe_apply(context<cpu> const& ctx, routing const& rt, moe_args<float> const& a) {
  int const E = a.experts, d = a.d_model, f = a.d_ff;
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  // y = act(x·upᵀ [, x·gateᵀ])·downᵀ for the rows of x.
  auto ffn = [&](mat const& xe, float const* w_up, float const* w_gate, float const* w_down) -> mat {
    Eigen::Map<mat const> up(w_up, f, d), down(w_down, d, f);
    mat h = xe * up.transpose();  // (rows, d_ff)
    if (a.act == activation::swiglu) {
      mat const g = xe * Eigen::Map<mat const>(w_gate, f, d).transpose();
      h = h.array() * g.unaryExpr([](float v) { return drdiff::detail::moe_silu(v); }).array();
    } else {
      h = h.unaryExpr([](float v) { return drdiff::detail::moe_gelu(v); });
    }
    return h * down.transpose();  // (rows, d_model)
  };
  mat y(rt.offsets[E], d);  // expert outputs in slot order
  int const threads = drdiff::detail::resolve_threads(ctx.num_threads);
  // Work items: each expert's rows in chunks of at most `chunk_rows`, so few experts (or one busy
  // expert) still use every thread. A row's result does not depend on the chunking beyond GEMM
  // blocking.
  constexpr int chunk_rows = 256;
  struct item { int expert, begin, rows; };
  std::vector<item> items;
  for (int e = 0; e < E; ++e)
    for (int b = rt.offsets[e]; b < rt.offsets[e + 1]; b += chunk_rows)
      items.push_back({e, b, std::min(chunk_rows, rt.offsets[e + 1] - b)});
  drdiff::detail::parallel_for(threads, std::int64_t(items.size()), [&](std::int64_t i, int) {
    item const it = items[std::size_t(i)];
    mat xe(it.rows, d);  // gathered rows of this expert's tokens
    for (int r = 0; r < it.rows; ++r)
      xe.row(r) = Eigen::Map<Eigen::RowVectorXf const>(a.x + std::size_t(rt.slot_entry[it.begin + r] / rt.width) * d, d);
    std::size_t const off = std::size_t(it.expert) * f * d;
    y.middleRows(it.begin, it.rows) = ffn(xe, a.w_up + off, a.w_gate ? a.w_gate + off : nullptr, a.w_down + off);
  });
  // Shared experts: dense over all tokens (in row chunks), added after the routed experts (weight 1).
  mat shared;
  if (a.shared_experts > 0) {
    shared = mat::Zero(a.tokens, d);
    std::int64_t const chunks = (a.tokens + chunk_rows - 1) / chunk_rows;
    drdiff::detail::parallel_for(threads, chunks, [&](std::int64_t c, int) {
      int const b = int(c) * chunk_rows, rows = std::min(chunk_rows, a.tokens - b);
      mat const xs = Eigen::Map<mat const>(a.x + std::size_t(b) * d, rows, d);
      for (int s2 = 0; s2 < a.shared_experts; ++s2) {
        std::size_t const off = std::size_t(s2) * f * d;
        shared.middleRows(b, rows) +=
            ffn(xs, a.w_shared_up + off, a.w_shared_gate ? a.w_shared_gate + off : nullptr, a.w_shared_down + off);
      }
    });
  }
  // Combine: each token sums its experts in selection order (no cross-expert atomics).
  auto combine = [&](auto& o, std::int64_t t) {
    o.setZero();
    for (int j = 0; j < rt.count[t]; ++j) {
      std::size_t const entry = std::size_t(t) * rt.width + j;
      if (rt.entry_slot[entry] >= 0) o += rt.weight[entry] * y.row(rt.entry_slot[entry]);
    }
    if (a.shared_experts > 0) o += shared.row(t);
  };
  drdiff::detail::parallel_for(threads, a.tokens, [&](std::int64_t t, int) {
    if (a.residual) {  // the sum first, then added to the residual stream
      Eigen::RowVectorXf o(d);
      combine(o, t);
      Eigen::Map<Eigen::RowVectorXf>(a.residual + std::size_t(t) * d, d) += o;
    } else {
      Eigen::Map<Eigen::RowVectorXf> o(a.out + std::size_t(t) * d, d);
      combine(o, t);
    }
  });
}


/// The routing decision of expert choice (router::expert_choice, routers.hpp), in the same form as
/// route()'s.
inline routing route(context<cpu> const& ctx, expert_choice const& r, moe_args<float> const& a,
                     moe_stats* stats = nullptr) {
  drdiff::detail::check_moe_args(a);
  r.validate(a.experts);
  int const T = a.tokens, E = a.experts, d = a.d_model;
  using mat = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  Eigen::Map<mat const> x(a.x, T, d), w(a.w_router, E, d);
  mat prob = x * w.transpose();  // (T, E) logits, then probabilities
  if (a.b_router) prob.rowwise() += Eigen::Map<Eigen::RowVectorXf const>(a.b_router, E);
  for (int t = 0; t < T; ++t) {
    float* z = prob.data() + std::size_t(t) * E;
    for (int e = 0; e < E; ++e)
      DRDIFF_CHECK(std::isfinite(z[e]), "moe: router logit [token ", t, ", expert ", e, "] = ", z[e], " is not finite");
    float p[max_experts];
    router::detail::softmax(z, E, p);
    std::copy(p, p + E, z);
  }
  int const c = r.per_expert(T, E);
  routing rt;
  rt.width = E;
  rt.count.assign(T, 0);
  rt.expert.assign(std::size_t(T) * E, -1);
  rt.weight.assign(std::size_t(T) * E, 0.f);
  std::vector<char> chosen(std::size_t(T) * E, 0);
  drdiff::detail::parallel_for(drdiff::detail::resolve_threads(ctx.num_threads), E, [&](std::int64_t e, int) {
    std::vector<int> idx(T);
    for (int t = 0; t < T; ++t) idx[t] = t;
    std::partial_sort(idx.begin(), idx.begin() + c, idx.end(), [&](int u, int v) {
      float const pu = prob(u, e), pv = prob(v, e);
      return pu > pv || (pu == pv && u < v);
    });
    for (int i = 0; i < c; ++i) chosen[std::size_t(idx[i]) * E + e] = 1;
  });
  for (int t = 0; t < T; ++t)  // each token's experts in increasing index: a fixed combine order
    for (int e = 0; e < E; ++e)
      if (chosen[std::size_t(t) * E + e]) {
        std::size_t const entry = std::size_t(t) * E + rt.count[t]++;
        rt.expert[entry] = e;
        rt.weight[entry] = prob(t, e);
      }
  rt.offsets.assign(E + 1, 0);
  for (int e = 0; e < E; ++e) rt.offsets[e + 1] = rt.offsets[e] + c;
  drdiff::detail::moe_scatter_slots(rt, T, E);
  if (stats) {
    stats->tokens_per_expert.assign(E, c);
    double active = 0;
    for (int t = 0; t < T; ++t) active += rt.count[t];
    stats->mean_active = T ? active / T : 0.0;
    stats->balance_loss = 1.0;  // every expert takes exactly c tokens
    stats->z_loss = 0.0;
    stats->dropped = 0;
  }
  return rt;
}

}  // namespace router

namespace detail {

/// router::moe_forward on the CPU: route (a token-choice functor, or expert choice), then the experts
/// and the combine. Allocates its own scratch.
template <>
struct moe_impl<cpu> {
  template <class Router, class T>
  static std::size_t workspace_bytes(context<cpu> const&, Router const&, router::moe_args<T> const&) {
    static_assert(std::is_same_v<T, float>, "drdiff::router::moe_forward (cpu): the element type is float.");
    return 0;
  }
  template <class Router, class T>
  static int forward(context<cpu> const& ctx, Router const& r, router::moe_args<T> const& a, void*, std::size_t) {
    static_assert(std::is_same_v<T, float>, "drdiff::router::moe_forward (cpu): the element type is float.");
    router::routing const rt = router::route(ctx, r, a, a.maybe_stats);
    router::moe_apply(ctx, rt, a);
    return rt.dropped;
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
