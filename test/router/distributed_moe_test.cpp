// Expert parallelism on the CPU: router::distributed_moe_forward over ranks that are threads
// (cpu_communicator), each with its chunk of the tokens and its E/P experts, against one
// router::moe_forward over every token with every expert. Routers, activations, shared experts, the
// residual form, uneven chunks, ranks that receive nothing; and the errors, on every rank.

#include <drdiff/drdiff.hpp>

#include <catch2/catch.hpp>

#include "../support/ranks.hpp"

#include <algorithm>
#include <cmath>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <thread>
#include <vector>

using namespace drdiff;
using Catch::Matchers::Contains;

namespace {

struct layer {
  int n = 0, d = 0, f = 0, E = 0, S = 0;
  router::activation act = router::activation::gelu;
  std::vector<float> x, w_router, b_router, w_up, w_gate, w_down, s_up, s_gate, s_down, scores;
};

layer make_layer(int n, int d, int f, int E, int S, router::activation act, unsigned seed) {
  layer L{n, d, f, E, S, act, {}, {}, {}, {}, {}, {}, {}, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  auto fill = [&](std::vector<float>& v, std::size_t size, float scale) {
    v.resize(size);
    for (auto& e : v) e = nd(rng) * scale;
  };
  fill(L.x, std::size_t(n) * d, 1.f);
  fill(L.w_router, std::size_t(E) * d, 0.5f);
  fill(L.b_router, std::size_t(E), 0.1f);
  fill(L.w_up, std::size_t(E) * f * d, 0.2f);
  fill(L.w_gate, std::size_t(E) * f * d, 0.2f);
  fill(L.w_down, std::size_t(E) * d * f, 0.2f);
  fill(L.s_up, std::size_t(S) * f * d, 0.2f);
  fill(L.s_gate, std::size_t(S) * f * d, 0.2f);
  fill(L.s_down, std::size_t(S) * d * f, 0.2f);
  L.scores.resize(std::size_t(n));
  for (auto& s : L.scores) s = std::uniform_real_distribution<float>(0.f, 1.f)(rng);
  return L;
}

router::moe_args<float> whole_args(layer const& L, std::vector<float>& out) {
  router::moe_args<float> a;
  a.tokens = L.n; a.d_model = L.d; a.d_ff = L.f; a.experts = L.E;
  a.x = L.x.data(); a.w_router = L.w_router.data(); a.b_router = L.b_router.data();
  a.w_up = L.w_up.data(); a.w_gate = L.w_gate.data(); a.w_down = L.w_down.data();
  a.act = L.act;
  a.shared_experts = L.S;
  if (L.S > 0) {
    a.w_shared_up = L.s_up.data(); a.w_shared_gate = L.s_gate.data(); a.w_shared_down = L.s_down.data();
  }
  a.maybe_token_scores = L.scores.data();
  a.timestep = 0.3f;
  out.assign(std::size_t(L.n) * L.d, 0.f);
  a.out = out.data();
  return a;
}

/// The layer over `ranks` threads; `tweak(rank, args, bytes)` may spoil one rank's arguments.
template <class Router, class Tweak>
std::vector<std::string> split(Router const& r, layer const& L, int ranks, std::vector<float>& out, bool residual,
                               Tweak&& tweak) {
  out.assign(std::size_t(L.n) * L.d, residual ? 0.25f : -7.f);
  thread_comm_group group(ranks);
  auto const errors = test::run_ranks(ranks, [&](int rank) {
    cpu_communicator comm(group, rank);
    distributed_context<cpu, cpu_communicator> d{{1}, &comm};
    attn::chunk const c = attn::sequence_chunk(L.n, ranks, rank);
    int const El = L.E / ranks;
    std::vector<float> whole;
    router::distributed_moe_args<float> args;
    args.local = whole_args(L, whole);
    auto& a = args.local;
    a.tokens = c.size();
    a.x = L.x.data() + std::size_t(c.begin) * L.d;
    a.maybe_token_scores = L.scores.data() + c.begin;
    a.w_up = L.w_up.data() + std::size_t(rank) * El * L.f * L.d;
    a.w_gate = L.w_gate.data() + std::size_t(rank) * El * L.f * L.d;
    a.w_down = L.w_down.data() + std::size_t(rank) * El * L.d * L.f;
    a.out = residual ? nullptr : out.data() + std::size_t(c.begin) * L.d;
    a.residual = residual ? out.data() + std::size_t(c.begin) * L.d : nullptr;
    // The size for the arguments as they were: a rank whose spoilt arguments are refused by the size
    // query would never reach the call, and the others would wait for it (as with NCCL).
    std::size_t bytes = router::distributed_moe_workspace_bytes(d, r, args);
    tweak(rank, args, bytes);  // may spoil the arguments; bytes = 0: size them again
    if (bytes == 0) bytes = router::distributed_moe_workspace_bytes(d, r, args);
    std::vector<unsigned char> ws(bytes);
    router::distributed_moe_forward(d, r, args, ws.data(), ws.size());
  });
  return errors;
}

template <class Router>
void check(Router const& r, layer const& L, int ranks, bool residual = false) {
  INFO("tokens " << L.n << " E " << L.E << " shared " << L.S << " ranks " << ranks << " residual " << residual);
  std::vector<float> ref, got;
  auto a = whole_args(L, ref);
  router::moe_forward(context<cpu>{1}, r, a);
  auto const errors = split(r, L, ranks, got, residual, [](int, auto&, std::size_t&) {});
  for (auto const& e : errors) REQUIRE(e == "");
  double err = 0, scale = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    double const want = residual ? 0.25 + double(ref[i]) : double(ref[i]);
    err = std::max(err, std::abs(want - double(got[i])));
    scale = std::max(scale, std::abs(want));
  }
  INFO("max error " << err << " of max " << scale);
  CHECK(scale > 0.1);
  CHECK(err <= 2e-5 * scale);
}

}  // namespace

TEST_CASE("expert-parallel MoE equals one call with every expert", "[router][moe][distributed][cpu]") {
  for (int ranks : {1, 2, 4}) {
    check(router::top_k{2, true}, make_layer(203, 32, 48, 8, 0, router::activation::gelu, 1), ranks);
    check(router::top_k{1, false}, make_layer(150, 24, 40, 8, 2, router::activation::swiglu, 2), ranks);
    check(router::top_p{0.5f, 1, 4, false}, make_layer(177, 32, 32, 8, 1, router::activation::gelu, 3), ranks, true);
    check(router::adaptive<router::external_score>{1, 3}, make_layer(120, 16, 32, 16, 0, router::activation::swiglu, 4),
          ranks);
  }
  // More ranks than some chunks have selections for one rank's experts; a rank with 1 token.
  check(router::top_k{1, true}, make_layer(9, 16, 16, 8, 1, router::activation::gelu, 5), 8);
}

TEST_CASE("expert-parallel MoE refuses bad arguments on every rank", "[router][moe][distributed][errors][cpu]") {
  layer L = make_layer(64, 16, 16, 8, 0, router::activation::gelu, 9);
  std::vector<float> out;
  auto others = [](std::vector<std::string> const& errors, int bad) {
    for (int r = 0; r < int(errors.size()); ++r)
      if (r != bad) CHECK_THAT(errors[std::size_t(r)], Contains("another rank's arguments were refused"));
  };
  auto e = split(router::top_k{2, true}, L, 2, out, false, [](int r, auto& args, std::size_t&) {
    if (r == 1) args.local.capacity_factor = 1.f;
  });
  CHECK_THAT(e[1], Contains("capacity_factor = 1"));
  others(e, 1);
  {  // 8 experts over 3 ranks: the size query refuses it on every rank
    thread_comm_group group(3);
    cpu_communicator comm(group, 0);
    distributed_context<cpu, cpu_communicator> d{{1}, &comm};
    std::vector<float> whole;
    router::distributed_moe_args<float> args;
    args.local = whole_args(L, whole);
    CHECK_THROWS_WITH(router::distributed_moe_workspace_bytes(d, router::top_k{2, true}, args),
                      Contains("E = 8 is not a multiple of the 3 ranks"));
  }
  e = split(router::top_k{2, true}, L, 2, out, false, [](int r, auto& args, std::size_t&) {
    if (r == 0) args.local.d_ff = 8;
  });
  CHECK_THAT(e[0] + e[1], Contains("disagree on d_ff"));
  router::moe_stats stats;
  e = split(router::top_k{2, true}, L, 2, out, false, [&](int r, auto& args, std::size_t&) {
    if (r == 0) args.local.maybe_stats = &stats;
  });
  CHECK_THAT(e[0], Contains("maybe_stats and maybe_timing must be null"));
  others(e, 0);
  // A rank whose bound is too small for what the routing sends it (rank 0 has more tokens than rank
  // 1 allows for, and every token prefers rank 1's experts): every rank stops with the same message.
  {
    layer B = make_layer(64, 16, 16, 8, 0, router::activation::gelu, 10);
    for (int ex = 4; ex < 8; ++ex) B.b_router[std::size_t(ex)] = 50.f;
    std::vector<float> extra(std::size_t(40) * 16);
    e = split(router::top_k{2, true}, B, 2, out, false, [&](int r, auto& args, std::size_t& bytes) {
      if (r == 0) {
        args.local.tokens = 40;
        args.local.out = extra.data();
      } else {
        args.max_tokens = 32;
      }
      bytes = 0;
    });
    for (auto const& s : e) CHECK_THAT(s, Contains("rank 1 would receive 144 rows, more than the 128"));
  }
  // A NaN in one rank's tokens: a non-finite router logit, reported on every rank.
  L.x[5] = std::numeric_limits<float>::quiet_NaN();
  e = split(router::top_k{2, true}, L, 2, out, false, [](int, auto&, std::size_t&) {});
  CHECK_THAT(e[0], Contains("rank 0: router logit [token 0, expert ") && Contains("is not finite"));
  CHECK_THAT(e[1], Contains("rank 0's routing failed"));
}
