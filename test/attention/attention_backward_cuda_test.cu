// The CUDA attention backward against the float64 oracle of the gradients
// (attention_backward_reference, on the host from the same rounded inputs), for every kind of policy,
// hsa tiers, padded batches and both head sizes, in bf16, fp16 and fp32; NaN propagation; errors.
// The gradients are poisoned before each run.

#include <drdiff/cuda.cuh>
#include <drdiff/cpu/attention_reference.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "../support/device_buffer.cuh"
#include "../support/drdiff_test.hpp"
#include "../support/user_policies.hpp"

using namespace drdiff;
using Catch::Matchers::Contains;
using test::dbuf;
using test::from_float;
using test::to_float;

namespace {

/// Worst over (batch, head) of max|x − y| / max|y|; a NaN in x is reported as infinity.
double rel_error(std::vector<float> const& x, std::vector<float> const& y, int batch, int n, int heads, int dim) {
  double worst = 0;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h) {
      double diff = 0, ref = 0;
      for (int i = 0; i < n; ++i)
        for (int d = 0; d < dim; ++d) {
          std::size_t const e = ((std::size_t(b) * n + i) * heads + h) * dim + d;
          if (std::isnan(x[e])) return INFINITY;
          diff = std::max(diff, std::abs(double(x[e]) - y[e]));
          ref = std::max(ref, std::abs(double(y[e])));
        }
      if (ref > 0) worst = std::max(worst, diff / ref);
      else worst = std::max(worst, diff);
    }
  return worst;
}

template <class T>
constexpr double grad_tolerance() { return std::is_same_v<T, float> ? 1e-4 : 2e-2; }

/// One problem on the GPU: random q, k, v and dO in T, the forward (o and lse), the backward.
template <class T>
struct gpu_problem {
  int batch, n, heads, dim;
  std::size_t elems;
  std::vector<T> hq, hk, hv, hg;
  std::vector<int> lens;
  dbuf<T> q, k, v, o, g, dq, dk, dv;
  dbuf<float> lse, dlse;
  dbuf<int> dlens;

  gpu_problem(int b, int n_, int h, int d, bool padded, std::uint64_t seed)
      : batch(b), n(n_), heads(h), dim(d), elems(std::size_t(b) * n_ * h * d), q(elems), k(elems), v(elems),
        o(elems), g(elems), dq(elems), dk(elems), dv(elems), lse(std::size_t(b) * h * n_), dlse(std::size_t(b) * h * n_),
        dlens(padded ? std::size_t(b) : 0) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto* t : {&hq, &hk, &hv, &hg}) {
      t->resize(elems);
      for (auto& x : *t) x = from_float<T>(nd(rng));
    }
    q.upload(hq); k.upload(hk); v.upload(hv); g.upload(hg);
    if (padded) {
      for (int i = 0; i < batch; ++i) lens.push_back(std::uniform_int_distribution<int>(1, n)(rng));
      lens[0] = n;
      dlens.upload(lens);
    }
  }
  attention_args<T> fwd() {
    auto a = make_attention_args<T>(q.ptr, k.ptr, v.ptr, o.ptr, batch, n, heads, dim);
    a.maybe_lse = lse.ptr;
    a.maybe_kv_lens = lens.empty() ? nullptr : dlens.ptr;
    return a;
  }
  attention_backward_args<T> bwd() { return make_attention_backward_args<T>(fwd(), g.ptr, dq.ptr, dk.ptr, dv.ptr); }

  template <class Policy>
  void run(Policy const& policy, float const* d_lse = nullptr) {
    context<drdiff::cuda> const ctx{};
    auto f = fwd();
    std::size_t const fb = attention_workspace_bytes(ctx, policy, f);
    dbuf<unsigned char> fws(fb);
    attention(ctx, policy, f, fws.ptr, fb);
    for (auto* x : {&dq, &dk, &dv}) DRDIFF_CUDA_CHECK(cudaMemset(x->ptr, 0xff, elems * sizeof(T)));  // NaN
    auto a = bwd();
    a.maybe_d_lse = d_lse;
    std::size_t const bb = attention_backward_workspace_bytes(ctx, policy, a);
    dbuf<unsigned char> bws(bb);
    attention_backward(ctx, policy, a, bws.ptr, bb);
    DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  }
  static std::vector<float> floats(dbuf<T> const& x) {
    std::vector<float> out;
    for (T const& e : x.download()) out.push_back(to_float(e));
    return out;
  }
  static std::vector<float> floats(std::vector<T> const& x) {
    std::vector<float> out;
    for (T const& e : x) out.push_back(to_float(e));
    return out;
  }
};

/// The GPU gradients of `policy` against the oracle's; `d_lse` adds a gradient of the lse.
template <class T, class Policy>
void check(Policy const& policy, int batch, int n, int heads, int dim, bool padded = false, bool with_d_lse = false) {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed << " batch " << batch << " N " << n << " heads " << heads << " D " << dim << " padded "
               << padded << " d_lse " << with_d_lse);
  gpu_problem<T> gp(batch, n, heads, dim, padded, seed);
  std::vector<float> hl;
  if (with_d_lse) {
    std::mt19937_64 rng(seed + 1);
    std::normal_distribution<float> nd(0.f, 1.f);
    hl.resize(gp.lse.n);
    for (auto& x : hl) x = nd(rng);
    gp.dlse.upload(hl);
  }
  gp.run(policy, with_d_lse ? gp.dlse.ptr : nullptr);

  auto fq = gpu_problem<T>::floats(gp.hq), fk = gpu_problem<T>::floats(gp.hk), fv = gpu_problem<T>::floats(gp.hv),
       fg = gpu_problem<T>::floats(gp.hg);
  std::vector<float> o(gp.elems), lse(gp.lse.n), rq(gp.elems, NAN), rk(gp.elems, NAN), rv(gp.elems, NAN);
  auto f = make_attention_args<float>(fq.data(), fk.data(), fv.data(), o.data(), batch, n, heads, dim);
  f.maybe_lse = lse.data();
  f.maybe_kv_lens = padded ? gp.lens.data() : nullptr;
  auto r = make_attention_backward_args<float>(f, fg.data(), rq.data(), rk.data(), rv.data());
  r.maybe_d_lse = with_d_lse ? hl.data() : nullptr;
  attention_backward_reference(policy, r);

  double const eq = rel_error(gpu_problem<T>::floats(gp.dq), rq, batch, n, heads, dim);
  double const ek = rel_error(gpu_problem<T>::floats(gp.dk), rk, batch, n, heads, dim);
  double const ev = rel_error(gpu_problem<T>::floats(gp.dv), rv, batch, n, heads, dim);
  INFO("relative errors dq " << eq << " dk " << ek << " dv " << ev);
  CHECK(eq <= grad_tolerance<T>());
  CHECK(ek <= grad_tolerance<T>());
  CHECK(ev <= grad_tolerance<T>());
}

}  // namespace

TEMPLATE_TEST_CASE("CUDA attention_backward matches the reference for every pattern", "[attention][backward][cuda]",
                   __nv_bfloat16, __half, float) {
  int const d = 64;
  check<TestType>(attn::dense{}, 2, 200, 2, d);
  check<TestType>(attn::local_window{16}, 1, 300, 2, d);
  check<TestType>(attn::local_window{500}, 1, 130, 1, d);  // N < w
  check<TestType>(attn::dilated{4, 100}, 1, 333, 2, d);
  int const rates[] = {1, 3, 8};
  check<TestType>(attn::dilated{2, 90, rates}, 1, 211, 3, d);  // per-head dilation
  check<TestType>(attn::local_window{12} | attn::dilated{2, 90, rates} | attn::global_tokens::strided(9), 2, 211, 3,
                  d, true);
  check<TestType>(attn::global_tokens::first(5), 1, 100, 2, d);
  check<TestType>(attn::global_tokens::strided(7), 1, 300, 1, d);
  check<TestType>(attn::local_window{12} | attn::dilated{3, 60} | attn::dilated{5, 100} | attn::global_tokens::first(4),
                  2, 257, 2, d);
  check<TestType>(attn::local_window{8} | attn::dilated{4, 64} | attn::global_tokens::strided(9), 3, 390, 2, d, true);
  check<TestType>(test::user_window{16}, 2, 333, 2, d);  // a user's policy with capabilities
  check<TestType>(test::user_sink_window{16, 8}, 1, 333, 2, d);
}

TEMPLATE_TEST_CASE("CUDA attention_backward on every hsa tier, head_dim 64 and 128, padded batches",
                   "[attention][backward][hsa][cuda]", __nv_bfloat16, __half) {
  auto const h = test::small_tiers();
  for (int n : {40, 65, 200, 601, 1111}) check<TestType>(h, 1, n, 2, 64);
  check<TestType>(h, 3, 700, 2, 128, true);
  check<TestType>(attn::local_window{16} | attn::global_tokens::first(8), 2, 400, 2, 128, true);
  check<TestType>(attn::hsa{}, 1, 1500, 2, 64);  // the default table's second tier
  // Global rows over more keys than one split holds: their keys split over CTAs.
  check<TestType>(attn::local_window{64} | attn::global_tokens::first(16), 1, 5000, 1, 64);
}

TEMPLATE_TEST_CASE("fp32 CUDA attention_backward takes every supported head_dim", "[attention][backward][cuda]",
                   float) {
  for (int d : {32, 72, 128, 256}) check<TestType>(attn::local_window{12} | attn::global_tokens::first(3), 1, 150, 2, d);
}

TEMPLATE_TEST_CASE("the CUDA lse gradient enters dS as in the reference", "[attention][backward][cuda]", __nv_bfloat16,
                   float) {
  check<TestType>(test::small_tiers(), 2, 400, 2, 64, false, true);
}

TEST_CASE("a NaN in q, k, v or dO reaches the CUDA gradients it touches", "[attention][backward][errors][cuda]") {
  auto const policy = attn::local_window{16} | attn::global_tokens::first(4);
  int const n = 300, heads = 2, dim = 64, row = 150;
  for (int which = 0; which < 4; ++which) {
    gpu_problem<__nv_bfloat16> gp(1, n, heads, dim, false, test::fresh_seed());
    auto& host = which == 0 ? gp.hq : which == 1 ? gp.hk : which == 2 ? gp.hv : gp.hg;
    auto& dev = which == 0 ? gp.q : which == 1 ? gp.k : which == 2 ? gp.v : gp.g;
    host[std::size_t(row) * heads * dim + 5] = from_float<__nv_bfloat16>(NAN);
    dev.upload(host);
    gp.run(policy);
    INFO("NaN in " << (which == 3 ? std::string("dO") : std::string(1, "qkv"[which])) << " at token " << row);
    auto dq = gpu_problem<__nv_bfloat16>::floats(gp.dq), dk = gpu_problem<__nv_bfloat16>::floats(gp.dk),
         dv = gpu_problem<__nv_bfloat16>::floats(gp.dv);
    auto at = [&](std::vector<float> const& x, int i, int d) { return x[std::size_t(i) * heads * dim + d]; };
    // Head 0: the row itself (q, dO) or a neighbour that attends key `row` (k, v) has a NaN dQ, and
    // key `row` a NaN dK; head 1 is untouched.
    CHECK(std::isnan(at(dq, which == 0 || which == 3 ? row : row + 3, 7)));
    CHECK(std::isnan(at(dk, row, 7)));
    CHECK(std::isfinite(at(dq, row, dim + 7)));
    CHECK(std::isfinite(at(dv, row, dim + 7)));
  }
}

TEST_CASE("CUDA attention_backward refuses what it cannot run", "[attention][backward][errors][cuda]") {
  context<drdiff::cuda> const ctx{};
  gpu_problem<__nv_bfloat16> gp(1, 100, 2, 64, false, 7);
  attn::local_window const w{8};
  auto a = gp.bwd();
  std::size_t const bytes = attention_backward_workspace_bytes(ctx, w, a);
  dbuf<unsigned char> ws(bytes);
  a.fwd.maybe_lse = nullptr;
  REQUIRE_THROWS_WITH(attention_backward(ctx, w, a, ws.ptr, bytes), Contains("fwd.maybe_lse is a null pointer"));
  a = gp.bwd();
  a.dv = a.dk;
  REQUIRE_THROWS_WITH(attention_backward(ctx, w, a, ws.ptr, bytes), Contains("dv overlaps dk"));
  a = gp.bwd();
  REQUIRE_THROWS_WITH(attention_backward(ctx, w, a, ws.ptr, bytes - 1024), Contains("is smaller than the"));
  REQUIRE_THROWS_WITH(attention_backward(ctx, w, a), Contains("a workspace of"));
  a.d_o = gp.g.ptr + 1;  // 2 bytes off: cp.async needs 16
  REQUIRE_THROWS_WITH(attention_backward(ctx, w, a, ws.ptr, bytes), Contains("d_o must be 16-byte aligned"));
}
