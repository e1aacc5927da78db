#pragma once
/// \file
/// Expert parallelism: `router::distributed_moe_forward(dctx, router, args, ws, bytes)` runs one MoE
/// layer whose E experts are split over the P ranks of a communicator (rank r holds experts
/// [r·E/P, (r+1)·E/P)), each rank holding its own tokens (its chunk of the sequence). Portable: the
/// expert FFNs are the backend's own router::moe_forward; the backends provide the element-wise steps
/// (detail::dist_exec, core/distributed.hpp) and the communicator moves the rows.
///
/// Per call and rank:
///   1. the ranks agree on the shapes (one small all-reduce: bad arguments on one rank are an error on
///      every rank, not a hang);
///   2. routing: the router logits (fp32) and the router functor, per token, as on one device;
///   3. dispatch: each token's selected rows go to the ranks that own their experts, grouped by
///      expert, in token order (an all-gather of the per-expert counts, then one exchange);
///   4. the rank's experts run on the rows it received (router::moe_forward with router::assigned);
///   5. combine: the results go back (the reverse exchange) and each token's output is Σ_j w_j · y_j in
///      its selection order, plus the shared experts (replicated, run on the token's own rank).
///
/// Dropless token-choice routers only (no capacity limit, no expert choice: both need the whole
/// batch's selections in one place).

#include <drdiff/core/backend.hpp>
#include <drdiff/core/distributed.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/core/traits.hpp>
#include <drdiff/router/moe.hpp>
#include <drdiff/router/routers.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace router {

/// A router for rows whose expert is already chosen: row t goes to expert experts[t] (memory of the
/// backend) with weight 1; the logits are not read.
struct assigned {
  int const* experts = nullptr;
  void validate(int) const { DRDIFF_CHECK(experts != nullptr, "assigned: the expert list is a null pointer"); }
  DRDIFF_HOST_DEVICE int max_selected(int) const { return 1; }
  DRDIFF_HOST_DEVICE int operator()(float const*, int, token_info const& info, int* e, float* w) const {
    e[0] = experts[info.token];
    w[0] = 1.f;
    return 1;
  }
};

/// Every expert, each with weight 1: the sum of all experts (shared experts run as routed ones).
struct every {
  void validate(int) const {}
  DRDIFF_HOST_DEVICE int max_selected(int e) const { return e; }
  DRDIFF_HOST_DEVICE int operator()(float const*, int e, token_info const&, int* ex, float* w) const {
    for (int j = 0; j < e; ++j) {
      ex[j] = j;
      w[j] = 1.f;
    }
    return e;
  }
};

/// The arguments of one rank. `local` is an ordinary call's arguments for this rank's tokens, with
/// two differences: `experts` is E, the number over all ranks, and w_up, w_gate and w_down hold only
/// this rank's E/P experts (w_up is [E/P × d_ff × d_model], …). The router and the shared experts
/// are the same on every rank. capacity_factor must be 0; maybe_stats and maybe_timing must be null.
template <class T = float>
struct distributed_moe_args {
  moe_args<T> local{};
  /// The most tokens any rank passes (0: this rank's tokens + 1, for chunks that differ by at most one
  /// token). It bounds the rows a rank can receive, P · max_tokens · min(width, E/P), which sizes the
  /// workspace; a call whose routing sends a rank more rows than its bound fails on every rank.
  int max_tokens = 0;
};

}  // namespace router

namespace detail {

/// z[t, e] = Σ_c x[t, c] · w[e, c] + b[e] in fp32, per element (t, e).
template <class T>
struct moe_logits_op {
  T const* x = nullptr;
  T const* w = nullptr;
  float const* b = nullptr;
  float* z = nullptr;
  int tokens = 0, experts = 0, dim = 0;
  DRDIFF_HOST_DEVICE constexpr std::int64_t size() const noexcept { return std::int64_t(tokens) * experts; }
  DRDIFF_HOST_DEVICE void operator()(std::int64_t i) const noexcept {
    std::int64_t const t = i / experts;
    int const e = int(i % experts);
    T const* xr = x + t * dim;
    T const* wr = w + std::int64_t(e) * dim;
    float s = 0.f;
    for (int c = 0; c < dim; ++c) s += dist_cast<float>(xr[c]) * dist_cast<float>(wr[c]);
    z[i] = s + (b ? b[e] : 0.f);
  }
};

/// The router functor per token, as router::moe_forward runs it (a non-finite logit sets *bad).
template <class Router>
struct moe_route_op {
  Router r{};
  float const* z = nullptr;
  int tokens = 0, experts = 0, width = 0;
  float timestep = 0.f;
  float const* scores = nullptr;
  int* count = nullptr;
  int* expert = nullptr;
  float* weight = nullptr;
  int* bad = nullptr;
  DRDIFF_HOST_DEVICE constexpr std::int64_t size() const noexcept { return tokens; }
  DRDIFF_HOST_DEVICE void operator()(std::int64_t t) const noexcept {
    float zt[router::max_experts];
    for (int e = 0; e < experts; ++e) {
      zt[e] = z[t * experts + e];
      // x − x is 0 exactly when x is finite (the library is not built with fast-math); one of the
      // bad entries is kept (any writer wins) so that the error can name it.
      if (!(zt[e] - zt[e] == 0.f)) *bad = int(t * experts + e) + 1;
    }
    router::token_info info;
    info.token = int(t);
    info.timestep = timestep;
    info.score = scores ? scores[t] : 0.f;
    count[t] = r(zt, experts, info, expert + t * width, weight + t * width);
  }
};

/// dst[i, :] = src[rows[i], :] for rows of `dim` elements.
template <class T>
struct moe_gather_op {
  T* dst = nullptr;
  T const* src = nullptr;
  int const* rows = nullptr;
  int count = 0, dim = 0;
  DRDIFF_HOST_DEVICE constexpr std::int64_t size() const noexcept { return std::int64_t(count) * dim; }
  DRDIFF_HOST_DEVICE void operator()(std::int64_t e) const noexcept {
    std::int64_t const i = e / dim;
    int const c = int(e % dim);
    dst[e] = src[std::int64_t(rows[i]) * dim + c];
  }
};

/// Token t's output: acc[t, c] (the shared experts) + Σ_j weight[t, j] · y[row[t, j], c] in selection
/// order, written to out or added to the fp32 residual.
template <class T>
struct moe_combine_op {
  float const* acc = nullptr;
  T const* y = nullptr;
  int const* row = nullptr;  ///< [tokens × width]: the selection's row of y
  int const* count = nullptr;
  float const* weight = nullptr;
  T* out = nullptr;
  float* residual = nullptr;
  int tokens = 0, width = 0, dim = 0;
  DRDIFF_HOST_DEVICE constexpr std::int64_t size() const noexcept { return std::int64_t(tokens) * dim; }
  DRDIFF_HOST_DEVICE void operator()(std::int64_t e) const noexcept {
    std::int64_t const t = e / dim;
    int const c = int(e % dim);
    float routed = 0.f;
    for (int j = 0; j < count[t]; ++j) {
      std::int64_t const s = t * width + j;
      routed += weight[s] * dist_cast<float>(y[std::int64_t(row[s]) * dim + c]);
    }
    float const v = routed + acc[e];
    if (residual) residual[e] += v;
    else out[e] = dist_cast<T>(v);
  }
};

template <class T>
struct moe_dist_layout {
  int T_ = 0, E = 0, El = 0, W = 0, d = 0, S = 0, rows_max = 0;
  std::size_t agree = 0, logits = 0, count = 0, expert = 0, weight = 0, bad = 0, send_rows = 0, combine_rows = 0;
  std::size_t counts_send = 0, counts_all = 0, send = 0, recv = 0, recv_expert = 0, y = 0, back = 0, acc = 0;
  std::size_t zeros = 0, inner = 0, inner_bytes = 0, total = 0;
};

template <class Backend, class Router, class T>
moe_dist_layout<T> moe_dist_make_layout(context<Backend> const& ctx, Router const& r,
                                        router::distributed_moe_args<T> const& args, int ranks) {
  auto const& a = args.local;
  moe_dist_layout<T> l;
  l.T_ = a.tokens;
  l.E = a.experts;
  l.El = a.experts / ranks;
  l.W = r.max_selected(a.experts);
  l.d = a.d_model;
  l.S = a.shared_experts;
  int const max_tokens = args.max_tokens > 0 ? args.max_tokens : a.tokens + 1;
  l.rows_max = int(std::min<std::int64_t>(std::int64_t(ranks) * max_tokens * std::min(l.W, l.El), INT32_MAX / 2));
  std::size_t const T_ = std::size_t(l.T_), E = std::size_t(l.E), W = std::size_t(l.W), d = std::size_t(l.d),
                    P = std::size_t(ranks), R = std::size_t(l.rows_max);
  std::size_t at = 0;
  l.agree = dist_take(at, dist_agree_count * sizeof(double));
  l.logits = dist_take(at, T_ * E * sizeof(float));
  l.count = dist_take(at, T_ * sizeof(int));
  l.expert = dist_take(at, T_ * W * sizeof(int));
  l.weight = dist_take(at, T_ * W * sizeof(float));
  l.bad = dist_take(at, sizeof(int));
  l.send_rows = dist_take(at, T_ * W * sizeof(int));
  l.combine_rows = dist_take(at, T_ * W * sizeof(int));
  l.counts_send = dist_take(at, (E + 1) * sizeof(int));
  l.counts_all = dist_take(at, P * (E + 1) * sizeof(int));
  l.send = dist_take(at, T_ * W * d * sizeof(T));
  l.recv = dist_take(at, R * d * sizeof(T));
  l.recv_expert = dist_take(at, R * sizeof(int));
  l.y = dist_take(at, R * d * sizeof(T));
  l.back = dist_take(at, T_ * W * d * sizeof(T));
  l.acc = dist_take(at, T_ * d * sizeof(float));
  l.zeros = dist_take(at, std::size_t(std::max(l.El, l.S)) * d * sizeof(T));
  // The inner calls: the rank's experts on the most rows it may receive; the shared experts.
  router::moe_args<T> in = a;
  in.tokens = l.rows_max;  // (the CUDA query reads only the sizes)
  in.experts = l.El;
  in.shared_experts = 0;
  in.maybe_token_scores = nullptr;
  in.b_router = nullptr;
  l.inner_bytes = router::moe_workspace_bytes(ctx, router::assigned{}, in);
  if (l.S > 0) {
    router::moe_args<T> sh = a;
    sh.experts = l.S;
    sh.shared_experts = 0;
    sh.b_router = nullptr;
    l.inner_bytes = std::max(l.inner_bytes, router::moe_workspace_bytes(ctx, router::every{}, sh));
  }
  l.inner = dist_take(at, l.inner_bytes);
  l.total = at + dist_align;
  return l;
}

template <class Backend, class Comm, class Router, class T>
void moe_dist_check(distributed_context<Backend, Comm> const& d, Router const& r,
                    router::distributed_moe_args<T> const& args) {
  auto const& a = args.local;
  int const P = d.comm->size();
  check_moe_args(a);
  r.validate(a.experts);
  DRDIFF_CHECK(a.experts % P == 0, "distributed_moe_forward: experts E = ", a.experts, " is not a multiple of the ",
               P, " ranks");
  DRDIFF_CHECK(a.capacity_factor == 0.f, "distributed_moe_forward: capacity_factor = ", a.capacity_factor,
               " must be 0 (a capacity limit needs every rank's selections in token order; expert parallelism is "
               "dropless)");
  DRDIFF_CHECK(!a.maybe_stats && !a.maybe_timing,
               "distributed_moe_forward: maybe_stats and maybe_timing must be null (not gathered across ranks)");
  DRDIFF_CHECK(args.max_tokens >= 0 && (args.max_tokens == 0 || args.max_tokens >= a.tokens),
               "distributed_moe_forward: max_tokens = ", args.max_tokens, " must be 0 or at least this rank's ",
               a.tokens, " tokens");
}

template <class Backend, class Comm, class Router, class T>
void moe_dist_run(distributed_context<Backend, Comm> const& dctx, Router const& r,
                  router::distributed_moe_args<T> const& args, moe_dist_layout<T> const& l, unsigned char* base) {
  using exec = dist_exec<Backend>;
  context<Backend> const& ctx = dctx.local;
  Comm& comm = *dctx.comm;
  auto const& a = args.local;
  int const P = comm.size(), me = comm.rank(), T_ = l.T_, E = l.E, El = l.El, W = l.W, d = l.d;
  auto at = [&](std::size_t off) { return base + off; };
  auto ip = [&](std::size_t off) { return reinterpret_cast<int*>(base + off); };
  auto fp = [&](std::size_t off) { return reinterpret_cast<float*>(base + off); };
  auto tp = [&](std::size_t off) { return reinterpret_cast<T*>(base + off); };

  // 2. Routing, then the selections on the host (the plan of the dispatch needs them there).
  exec::zero(ctx, at(l.bad), sizeof(int));
  exec::for_each(ctx, moe_logits_op<T>{a.x, a.w_router, a.b_router, fp(l.logits), T_, E, d});
  exec::for_each(ctx, moe_route_op<Router>{r, fp(l.logits), T_, E, W, a.timestep, a.maybe_token_scores,
                                           ip(l.count), ip(l.expert), fp(l.weight), ip(l.bad)});
  std::vector<int> count(static_cast<std::size_t>(T_)), expert(static_cast<std::size_t>(T_) * W);
  int bad_entry = 0;
  exec::download(ctx, &bad_entry, at(l.bad), sizeof(int));
  exec::download(ctx, count.data(), at(l.count), count.size() * sizeof(int));
  exec::download(ctx, expert.data(), at(l.expert), expert.size() * sizeof(int));
  // A non-finite logit or a selection outside the router's contract is this rank's error; the
  // others learn of it from the counts' flag below, and all stop together.
  std::string own_failure;
  if (bad_entry > 0) {
    float z = 0.f;
    exec::download(ctx, &z, at(l.logits + std::size_t(bad_entry - 1) * sizeof(float)), sizeof(float));
    own_failure = "distributed_moe_forward: rank " + std::to_string(me) + ": router logit [token " +
                  std::to_string((bad_entry - 1) / E) + ", expert " + std::to_string((bad_entry - 1) % E) + "] = " +
                  std::to_string(z) + " is not finite";
  }
  for (int t = 0; t < T_ && own_failure.empty(); ++t) {
    int const n = count[std::size_t(t)];
    bool ok = n >= 0 && n <= W;
    for (int j = 0; ok && j < n; ++j) ok = expert[std::size_t(t) * W + j] >= 0 && expert[std::size_t(t) * W + j] < E;
    if (!ok)
      own_failure = "distributed_moe_forward: rank " + std::to_string(me) + ": the router selected " +
                    std::to_string(n) + " experts for token " + std::to_string(t) + ", outside its contract (at most " +
                    std::to_string(W) + ", each in 0.." + std::to_string(E - 1) + ")";
  }
  bool const bad = !own_failure.empty();

  // 3. The dispatch plan: rows grouped by expert (so by owner rank), tokens in order within one.
  std::vector<int> per_expert(static_cast<std::size_t>(E) + 1, 0);  // + this rank's bound on received rows
  for (int t = 0; t < T_ && !bad; ++t)
    for (int j = 0; j < count[std::size_t(t)]; ++j) ++per_expert[std::size_t(expert[std::size_t(t) * W + j])];
  std::vector<int> first(static_cast<std::size_t>(E) + 1, 0);
  for (int e = 0; e < E; ++e) first[std::size_t(e) + 1] = first[std::size_t(e)] + per_expert[std::size_t(e)];
  std::vector<int> send_rows(static_cast<std::size_t>(first[std::size_t(E)])),
      combine_rows(static_cast<std::size_t>(T_) * W, 0);
  {
    std::vector<int> next(first.begin(), first.end() - 1);
    for (int t = 0; t < T_ && !bad; ++t)
      for (int j = 0; j < count[std::size_t(t)]; ++j) {
        int const row = next[std::size_t(expert[std::size_t(t) * W + j])]++;
        send_rows[std::size_t(row)] = t;
        combine_rows[std::size_t(t) * W + j] = row;
      }
  }
  per_expert[std::size_t(E)] = bad ? -1 : l.rows_max;  // −1: this rank's routing failed
  exec::upload(ctx, at(l.counts_send), per_expert.data(), per_expert.size() * sizeof(int));
  comm.all_gather(ctx, at(l.counts_send), at(l.counts_all), per_expert.size() * sizeof(int));
  std::vector<int> all(static_cast<std::size_t>(P) * (E + 1));
  exec::download(ctx, all.data(), at(l.counts_all), all.size() * sizeof(int));
  auto cnt = [&](int s, int e) { return all[std::size_t(s) * (E + 1) + std::size_t(e)]; };
  // Every rank checks every rank's routing and bound, so all of them stop together.
  DRDIFF_CHECK(own_failure.empty(), own_failure);
  for (int s = 0; s < P; ++s) {
    DRDIFF_CHECK(cnt(s, E) >= 0, "distributed_moe_forward: rank ", s, "'s routing failed (a router logit that is "
                 "not finite, or a selection outside the router's contract; its error says which)");
    long long rows = 0;
    for (int x = 0; x < P; ++x)
      for (int e = s * El; e < (s + 1) * El; ++e) rows += cnt(x, e);
    DRDIFF_CHECK(rows <= cnt(s, E), "distributed_moe_forward: rank ", s, " would receive ", rows,
                 " rows, more than the ", cnt(s, E), " its workspace holds (max_tokens bounds them: raise it)");
  }
  // What this rank sends each rank (rows of its experts), and receives from each (rows for its own).
  std::vector<int> n_send(static_cast<std::size_t>(P), 0), n_recv(static_cast<std::size_t>(P), 0), recv_expert;
  for (int s = 0; s < P; ++s)
    for (int e = s * El; e < (s + 1) * El; ++e) n_send[std::size_t(s)] += cnt(me, e);
  for (int s = 0; s < P; ++s)
    for (int e = me * El; e < (me + 1) * El; ++e) {
      n_recv[std::size_t(s)] += cnt(s, e);
      recv_expert.insert(recv_expert.end(), std::size_t(cnt(s, e)), e - me * El);
    }
  int const R = int(recv_expert.size());
  exec::upload(ctx, at(l.send_rows), send_rows.data(), send_rows.size() * sizeof(int));
  exec::upload(ctx, at(l.combine_rows), combine_rows.data(), combine_rows.size() * sizeof(int));
  exec::upload(ctx, at(l.recv_expert), recv_expert.data(), recv_expert.size() * sizeof(int));

  // The rows, to their experts' ranks (rows of expert e in the send buffer are already by owner).
  exec::for_each(ctx, moe_gather_op<T>{tp(l.send), a.x, ip(l.send_rows), int(send_rows.size()), d});
  std::size_t const row_bytes = std::size_t(d) * sizeof(T);
  auto plan = [&](std::vector<int> const& counts, T* buf) {
    std::vector<transfer> v;
    std::size_t off = 0;
    for (int s = 0; s < P; ++s) {
      if (counts[std::size_t(s)] > 0) v.push_back({s, buf + off * d, std::size_t(counts[std::size_t(s)]) * row_bytes});
      off += std::size_t(counts[std::size_t(s)]);
    }
    return v;
  };
  {
    auto const sends = plan(n_send, tp(l.send)), recvs = plan(n_recv, tp(l.recv));
    comm.exchange(ctx, sends.data(), int(sends.size()), recvs.data(), int(recvs.size()));
  }

  // 4. This rank's experts on the rows it received.
  if (R > 0) {
    exec::zero(ctx, at(l.zeros), std::size_t(El) * d * sizeof(T));
    router::moe_args<T> in = a;
    in.tokens = R;
    in.experts = El;
    in.x = tp(l.recv);
    in.w_router = tp(l.zeros);
    in.b_router = nullptr;
    in.out = tp(l.y);
    in.residual = nullptr;
    in.shared_experts = 0;
    in.maybe_token_scores = nullptr;
    router::moe_forward(ctx, router::assigned{ip(l.recv_expert)}, in, at(l.inner), l.inner_bytes);
  }

  // 5. The results back, in the order they were sent.
  {
    auto const sends = plan(n_recv, tp(l.y)), recvs = plan(n_send, tp(l.back));
    comm.exchange(ctx, sends.data(), int(sends.size()), recvs.data(), int(recvs.size()));
  }
  exec::zero(ctx, at(l.acc), std::size_t(T_) * d * sizeof(float));
  if (l.S > 0 && T_ > 0) {
    exec::zero(ctx, at(l.zeros), std::size_t(l.S) * d * sizeof(T));
    router::moe_args<T> sh = a;
    sh.experts = l.S;
    sh.w_router = tp(l.zeros);
    sh.b_router = nullptr;
    sh.w_up = a.w_shared_up;
    sh.w_gate = a.w_shared_gate;
    sh.w_down = a.w_shared_down;
    sh.shared_experts = 0;
    sh.out = nullptr;
    sh.residual = fp(l.acc);
    sh.maybe_token_scores = nullptr;
    router::moe_forward(ctx, router::every{}, sh, at(l.inner), l.inner_bytes);
  }
  exec::for_each(ctx, moe_combine_op<T>{fp(l.acc), tp(l.back), ip(l.combine_rows), ip(l.count), fp(l.weight), a.out,
                                        a.residual, T_, W, d});
}

}  // namespace detail

namespace router {

/// Bytes of workspace distributed_moe_forward needs on this rank.
template <class Backend, class Comm, class Router, class T>
std::size_t distributed_moe_workspace_bytes(distributed_context<Backend, Comm> const& d, Router const& r,
                                            distributed_moe_args<T> const& args) {
  static_assert(!std::is_same_v<Router, expert_choice>, "drdiff::router::distributed_moe_forward: expert choice "
                "routes over the whole batch at once; use a token-choice router");
  drdiff::detail::dist_check_comm("distributed_moe_forward", d.comm);
  drdiff::detail::moe_dist_check(d, r, args);
  return drdiff::detail::moe_dist_make_layout(d.local, r, args, d.comm->size()).total;
}

/// Runs one expert-parallel MoE layer; every rank calls it with the same router, shapes and shared
/// experts, its own tokens and its own experts' weights. Collective: a rank whose arguments are
/// refused throws drdiff::error, and so do all the others. `workspace` is caller-owned backend memory
/// of at least distributed_moe_workspace_bytes(). The output equals router::moe_forward on one device
/// with all the experts and all the tokens, up to the order of sums.
template <class Backend, class Comm, class Router, class T>
void distributed_moe_forward(distributed_context<Backend, Comm> const& d, Router const& r,
                             distributed_moe_args<T> const& args, void* workspace, std::size_t workspace_bytes) {
  static_assert(is_backend_v<Backend>, "drdiff::router::distributed_moe_forward: Backend must be drdiff::cpu or "
                "drdiff::cuda.");
  static_assert(!std::is_same_v<Router, expert_choice>, "drdiff::router::distributed_moe_forward: expert choice "
                "routes over the whole batch at once; use a token-choice router");
  drdiff::detail::dist_check_comm("distributed_moe_forward", d.comm);
  auto& comm = *d.comm;
  drdiff::detail::dist_exec<Backend>::enter(d.local);
  drdiff::detail::dist_check_agree_space("distributed_moe_forward", comm, workspace, workspace_bytes);
  unsigned char* const base = drdiff::detail::dist_aligned(workspace);
  auto const& a = args.local;
  std::string failure;
  drdiff::detail::moe_dist_layout<T> lay;
  try {
    drdiff::detail::moe_dist_check(d, r, args);
    lay = drdiff::detail::moe_dist_make_layout(d.local, r, args, comm.size());
    DRDIFF_CHECK(workspace_bytes >= lay.total, "distributed_moe_forward: workspace_bytes = ", workspace_bytes,
                 " is smaller than the ", lay.total, " bytes distributed_moe_workspace_bytes() asks for");
  } catch (error const& e) {
    failure = e.what();
  }
  double const shape[5] = {double(a.experts), double(a.d_model), double(a.d_ff),
                           double(a.shared_experts) * 4 + double(int(a.act)), double(sizeof(T))};
  char const* const names[5] = {"experts", "d_model", "d_ff", "the shared experts or the activation",
                                "the element size"};
  drdiff::detail::dist_agree<Backend>(d, "distributed_moe_forward", failure, shape, names, 5, base);
  try {
    drdiff::detail::moe_dist_run(d, r, args, lay, base);
  } catch (...) {
    if constexpr (drdiff::detail::has_abort<std::decay_t<decltype(comm)>>::value) comm.abort();
    throw;
  }
}

}  // namespace router
DRDIFF_NAMESPACE_END
