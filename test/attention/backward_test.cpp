// drdiff::attention_backward on the CPU against the float64 gradients of attention_backward_reference
// (itself checked by finite differences), for every kind of policy, padded batches and strided
// tensors; determinism across thread counts; NaN propagation; bad arguments.

#include "../support/drdiff_test.hpp"
#include "../support/user_policies.hpp"

#include <drdiff/cpu/attention_backward.hpp>
#include <drdiff/cpu/attention_reference.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <vector>

using namespace drdiff;
using Catch::Matchers::Contains;

namespace {

/// A forward problem with its output, lse and a random dO, and gradient buffers (poisoned).
template <class T>
struct grad_problem {
  test::problem<T> p;
  std::vector<T> g, dq, dk, dv;
  grad_problem(int b, int n, int h, int d, std::uint64_t seed, int pad = 0) : p(b, n, h, d, seed, pad) {
    std::mt19937_64 rng(seed ^ 0x9e3779b97f4a7c15ull);
    std::normal_distribution<double> nd(0.0, 1.0);
    g.resize(p.q.size());
    for (auto& x : g) x = T(nd(rng));
    poison();
  }
  void poison() {
    for (auto* t : {&dq, &dk, &dv}) t->assign(p.q.size(), std::numeric_limits<T>::quiet_NaN());
  }
  attention_backward_args<T> args() {
    attention_backward_args<T> a{};
    a.fwd = p.args();
    a.d_o = g.data(); a.dq = dq.data(); a.dk = dk.data(); a.dv = dv.data();
    a.do_strides = a.dq_strides = a.dk_strides = a.dv_strides = p.strides();
    return a;
  }
};

/// max |x − y| / max |y| over the valid elements of a [batch, seq, heads, dim] tensor with row padding.
template <class T>
double rel_error(test::problem<T> const& p, std::vector<T> const& x, std::vector<T> const& y) {
  double diff = 0, ref = 0;
  for (int b = 0; b < p.batch; ++b)
    for (int i = 0; i < p.seq; ++i)
      for (int h = 0; h < p.heads; ++h)
        for (int d = 0; d < p.dim; ++d) {
          std::size_t const e = (std::size_t(b) * p.seq + i) * p.stride_seq() + std::size_t(h) * p.dim + d;
          if (std::isnan(double(x[e])) || std::isnan(double(y[e]))) return std::numeric_limits<double>::infinity();
          diff = std::max(diff, std::abs(double(x[e]) - double(y[e])));
          ref = std::max(ref, std::abs(double(y[e])));
        }
  return diff / std::max(ref, 1e-30);
}

template <class T>
constexpr double grad_tolerance() { return std::is_same_v<T, float> ? 2e-4 : 1e-10; }

/// Forward, backward and the reference gradients; each of dQ, dK, dV within tolerance.
template <class T, class Policy>
void check(Policy const& policy, int batch, int n, int heads, int dim, bool padded = false, int pad = 0,
           int threads = 2) {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed << " batch " << batch << " N " << n << " heads " << heads << " D " << dim << " padded "
               << padded << " row pad " << pad);
  grad_problem<T> gp(batch, n, heads, dim, seed, pad);
  if (padded) {
    std::mt19937_64 rng(seed);
    gp.p.kv_lens.assign(std::size_t(batch), n);
    for (int b = 1; b < batch; ++b) gp.p.kv_lens[std::size_t(b)] = int(1 + rng() % std::uint64_t(n));
  }
  context<cpu> const ctx{threads};
  attention(ctx, policy, gp.p.args());
  attention_backward(ctx, policy, gp.args());
  std::vector<T> dq = gp.dq, dk = gp.dk, dv = gp.dv;
  gp.poison();
  attention_backward_reference(policy, gp.args(), threads);
  double const eq = rel_error(gp.p, dq, gp.dq), ek = rel_error(gp.p, dk, gp.dk), ev = rel_error(gp.p, dv, gp.dv);
  INFO("relative error dq " << eq << " dk " << ek << " dv " << ev);
  CHECK(eq <= grad_tolerance<T>());
  CHECK(ek <= grad_tolerance<T>());
  CHECK(ev <= grad_tolerance<T>());
}

}  // namespace

TEST_CASE("the gradients' reference agrees with finite differences", "[attention][backward][cpu]") {
  // L = Σ O ∘ G + Σ lse ∘ H, so ∂L/∂x by central differences of the float64 forward reference.
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  auto const policy = attn::local_window{5} | attn::dilated{3, 12} | attn::global_tokens::first(2);
  grad_problem<double> gp(2, 23, 2, 32, seed);
  gp.p.kv_lens = {23, 17};
  std::mt19937_64 hr(seed + 1);
  std::normal_distribution<double> hn(0.0, 1.0);
  std::vector<double> hl(gp.p.lse.size());
  for (auto& x : hl) x = hn(hr);
  auto ba = gp.args();
  ba.maybe_d_lse = hl.data();
  attention_backward_reference(policy, ba);
  auto loss = [&] {
    std::vector<double> o, lse;
    auto a = gp.p.args_into(o, lse);
    attention_reference(policy, a);
    double l = 0;
    for (std::size_t i = 0; i < o.size(); ++i) l += o[i] * gp.g[i];
    for (std::size_t i = 0; i < lse.size(); ++i) l += lse[i] * hl[i];
    return l;
  };
  std::mt19937_64 rng(seed);
  double worst = 0;
  for (int which = 0; which < 3; ++which) {
    std::vector<double>& x = which == 0 ? gp.p.q : which == 1 ? gp.p.k : gp.p.v;
    std::vector<double> const& grad = which == 0 ? gp.dq : which == 1 ? gp.dk : gp.dv;
    for (int trial = 0; trial < 40; ++trial) {
      std::size_t const e = std::size_t(rng() % x.size());
      double const h = 1e-5, x0 = x[e];
      x[e] = x0 + h;
      double const up = loss();
      x[e] = x0 - h;
      double const down = loss();
      x[e] = x0;
      double const fd = (up - down) / (2 * h);
      worst = std::max(worst, std::abs(fd - grad[e]) / std::max(1.0, std::abs(fd)));
    }
  }
  INFO("worst difference " << worst);
  CHECK(worst < 1e-7);
}

TEMPLATE_TEST_CASE("attention_backward matches the reference for every pattern", "[attention][backward][cpu]", float,
                   double) {
  int const d = 64;
  check<TestType>(attn::dense{}, 2, 150, 2, d);
  check<TestType>(attn::local_window{16}, 1, 300, 2, d);
  check<TestType>(attn::local_window{500}, 1, 130, 1, d);  // N < w
  check<TestType>(attn::dilated{4, 100}, 1, 333, 2, d);
  int const rates[] = {1, 3, 8};
  check<TestType>(attn::dilated{2, 90, rates}, 1, 211, 3, d);  // per-head dilation
  check<TestType>(attn::local_window{12} | attn::dilated{2, 90, rates} | attn::global_tokens::strided(9), 2, 211, 3,
                  d, true);
  check<TestType>(attn::global_tokens::first(5), 1, 100, 2, d);
  check<TestType>(attn::global_tokens::strided(7), 1, 300, 1, d);
  int const list[] = {2, 40, 41, 200};
  check<TestType>(attn::local_window{8} | attn::global_tokens::explicit_list(list, 4), 2, 260, 2, d, true);
  check<TestType>(attn::local_window{12} | attn::dilated{3, 60} | attn::dilated{5, 100} | attn::global_tokens::first(4),
                  2, 257, 2, d);
  check<TestType>(test::documents{}, 2, 150, 2, d);
  check<TestType>(attn::local_window{8} | attn::dilated{4, 64}, 1, 200, 2, 128, false, 24);  // strided rows, D 128
}

TEMPLATE_TEST_CASE("attention_backward on every hsa tier and padded batches", "[attention][backward][hsa][cpu]", float,
                   double) {
  auto const h = test::small_tiers();
  for (int n : {40, 65, 200, 256, 601, 1111}) check<TestType>(h, 1, n, 2, 64);
  check<TestType>(h, 3, 700, 2, 32, true);
  check<TestType>(attn::hsa{}, 1, 1500, 1, 64);  // the default table's second tier
}

TEMPLATE_TEST_CASE("the gradient of the lse enters dS as in the reference", "[attention][backward][cpu]", float,
                   double) {
  auto const policy = test::small_tiers();
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  grad_problem<TestType> gp(2, 400, 2, 64, seed);
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<TestType> dl(gp.p.lse.size());
  for (auto& x : dl) x = TestType(nd(rng));
  attention(context<cpu>{2}, policy, gp.p.args());
  auto a = gp.args();
  a.maybe_d_lse = dl.data();
  attention_backward(context<cpu>{2}, policy, a);
  auto const dq = gp.dq, dk = gp.dk, dv = gp.dv;
  gp.poison();
  attention_backward_reference(policy, a);
  CHECK(rel_error(gp.p, dq, gp.dq) <= grad_tolerance<TestType>());
  CHECK(rel_error(gp.p, dk, gp.dk) <= grad_tolerance<TestType>());
  CHECK(rel_error(gp.p, dv, gp.dv) <= grad_tolerance<TestType>());  // dV does not depend on it
  a.maybe_d_lse = gp.dq.data();  // an input inside an output
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{2}, policy, a), Contains("dq overlaps d_lse"));
}

TEST_CASE("attention_backward is deterministic whatever the thread count", "[attention][backward][cpu]") {
  auto const policy = test::small_tiers();
  grad_problem<float> gp(2, 700, 3, 64, test::fresh_seed());
  attention(context<cpu>{2}, policy, gp.p.args());
  attention_backward(context<cpu>{1}, policy, gp.args());
  auto const dq = gp.dq, dk = gp.dk, dv = gp.dv;
  for (int threads : {2, 3, 8}) {
    gp.poison();
    std::vector<unsigned char> ws(attention_backward_workspace_bytes(context<cpu>{threads}, policy, gp.args()));
    attention_backward(context<cpu>{threads}, policy, gp.args(), ws.data(), ws.size());
    CHECK(gp.dq == dq);
    CHECK(gp.dk == dk);
    CHECK(gp.dv == dv);
  }
}

TEST_CASE("a NaN in q, k, v or dO reaches the gradients it touches", "[attention][backward][errors][cpu]") {
  auto const policy = attn::local_window{16} | attn::global_tokens::first(4);
  for (int which = 0; which < 4; ++which) {
    grad_problem<float> gp(1, 300, 2, 64, test::fresh_seed());
    int const row = 150;
    std::vector<float>& t = which == 0 ? gp.p.q : which == 1 ? gp.p.k : which == 2 ? gp.p.v : gp.g;
    t[std::size_t(row) * gp.p.stride_seq() + 5] = std::nanf("");
    attention(context<cpu>{2}, policy, gp.p.args());
    attention_backward(context<cpu>{2}, policy, gp.args());
    INFO("NaN in " << (which == 3 ? "dO" : std::string(1, "qkv"[which])) << " at token " << row);
    auto at = [&](std::vector<float> const& x, int i, int d) { return x[std::size_t(i) * gp.p.stride_seq() + d]; };
    // Row `row` (q, dO) or its neighbours that attend key `row` (k, v): their dQ is NaN in head 0;
    // head 1 is untouched.
    CHECK(std::isnan(at(gp.dq, which == 0 || which == 3 ? row : row + 3, 7)));
    CHECK(std::isnan(at(gp.dk, row, 7)));  // key `row` is attended by rows that saw the NaN
    CHECK(std::isfinite(at(gp.dq, row, 64 + 7)));
    CHECK(std::isfinite(at(gp.dv, row, 64 + 7)));
  }
}

TEST_CASE("attention_backward refuses what it cannot run", "[attention][backward][errors][cpu]") {
  grad_problem<float> gp(1, 100, 2, 64, 7);
  attn::local_window const w{8};
  attention(context<cpu>{}, w, gp.p.args());
  auto a = gp.args();
  a.fwd.maybe_lse = nullptr;
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{}, w, a), Contains("fwd.maybe_lse is a null pointer"));
  a = gp.args();
  a.dk = nullptr;
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{}, w, a), Contains("dk is a null pointer"));
  a = gp.args();
  a.dq = gp.p.q.data();
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{}, w, a), Contains("dq overlaps q"));
  a = gp.args();
  a.dv = a.dk;
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{}, w, a), Contains("dv overlaps dk"));
  a = gp.args();
  a.dq_strides.seq = 0;
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{}, w, a), Contains("an output cannot broadcast"));
  a = gp.args();
  std::vector<unsigned char> small(16);
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{}, w, a, small.data(), small.size()),
                      Contains("is smaller than the"));
  REQUIRE_THROWS_WITH(attention_backward(context<cpu>{-1}, w, a), Contains("num_threads = -1"));
}
