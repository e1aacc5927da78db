// Bad input gets a drdiff::error whose message names the parameter and the value.

#include <catch2/catch.hpp>

#include <thread>

#include "../support/drdiff_test.hpp"

using namespace drdiff;
using Catch::Matchers::Contains;

namespace {
struct fixture {
  test::problem<float> p{1, 100, 2, 64, 42};
  attention_args<float> a = p.args();
  context<cpu> ctx{1};
  attn::local_window w{8};
};
}  // namespace

TEST_CASE("zero or negative sizes are rejected", "[attention][errors][cpu]") {
  fixture f;
  auto a = f.a;
  a.batch = 0;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("batch = 0"));
  a = f.a; a.seq = -3;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("seq = -3"));
  a = f.a; a.heads = 0;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("heads = 0"));
  REQUIRE_THROWS_AS(attention(f.ctx, f.w, a), drdiff::error);
}

TEST_CASE("unsupported head_dim is rejected", "[attention][errors][cpu]") {
  fixture f;
  for (int d : {0, 16, 24, 100, 264}) {
    auto a = f.a;
    a.head_dim = d;
    REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("head_dim = " + std::to_string(d)));
  }
}

TEST_CASE("bad policy parameters are rejected", "[attention][errors][cpu]") {
  fixture f;
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::local_window{-1}, f.a), Contains("w = -1"));
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::dilated{0, 10}, f.a), Contains("delta = 0"));
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::dilated{2, -5}, f.a), Contains("span s = -5"));
  int const rates[] = {2, 0};
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::dilated{2, 10, rates}, f.a), Contains("delta[1] = 0"));
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::local_window{32} | attn::dilated{2, 16}, f.a),
                      Contains("span s = 16") && Contains("w = 32"));
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::global_tokens::first(101), f.a),
                      Contains("G = 101") && Contains("N = 100"));
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::global_tokens::first(-2), f.a), Contains("G = -2"));
  int const unsorted[] = {5, 3};
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::global_tokens::explicit_list(unsorted, 2), f.a),
                      Contains("list[1] = 3"));
  int const outside[] = {5, 100};
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::global_tokens::explicit_list(outside, 2), f.a),
                      Contains("list[1] = 100"));
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::global_tokens::explicit_list(nullptr, 2), f.a), Contains("null"));
}

TEST_CASE("bad unions and tier tables are rejected", "[attention][errors][cpu]") {
  fixture f;
  auto const d = attn::dilated{2, 10};
  REQUIRE_THROWS_WITH(d | d | d | d | d, Contains("5 dilated components"));
  REQUIRE_THROWS_WITH(attn::global_tokens::first(2) | attn::global_tokens::strided(3), Contains("global tokens"));
  attn::hsa_tier const bad_order[] = {{500, true, 0, 1, 0, {}, nullptr}, {400, true, 0, 1, 0, {}, nullptr}};
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::hsa::from_tiers(bad_order), f.a), Contains("max_len must increase"));
  attn::hsa_tier const short_table[] = {{50, true, 0, 1, 0, {}, nullptr}};
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::hsa::from_tiers(short_table), f.a), Contains("N = 100"));
  attn::hsa_tier const small_span[] = {{1000, false, 64, 2, 32, {}, nullptr}};
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::hsa::from_tiers(small_span), f.a), Contains("span s = 32"));
  attn::hsa_tier const zero_rate[] = {{1000, false, 4, 0, 32, {}, nullptr}};
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::hsa::from_tiers(zero_rate), f.a), Contains("delta = 0"));
}

TEST_CASE("null pointers are rejected", "[attention][errors][cpu]") {
  fixture f;
  auto a = f.a; a.q = nullptr;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("q is a null pointer"));
  a = f.a; a.k = nullptr;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("k is a null pointer"));
  a = f.a; a.v = nullptr;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("v is a null pointer"));
  a = f.a; a.o = nullptr;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("o is a null pointer"));
}

TEST_CASE("inconsistent strides are rejected", "[attention][errors][cpu]") {
  fixture f;
  auto a = f.a;
  a.o_strides.seq = 64;  // heads · head_dim = 128: rows would overlap
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("o strides are inconsistent") && Contains("64"));
  a = f.a; a.q_strides.head = -64;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("q strides") && Contains("head = -64"));
  a = f.a; a.o_strides.head = 0;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("o stride of head is 0"));
  a = f.a; a.k_strides.head = 0;  // an input may broadcast one head's keys to all heads
  REQUIRE_NOTHROW(attention(f.ctx, f.w, a));
}

TEST_CASE("bad key lengths, scale, threads and workspace are rejected", "[attention][errors][cpu]") {
  fixture f;
  int lens0[] = {0};
  auto a = f.a; a.maybe_kv_lens = lens0;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("kv_lens[0] = 0"));
  int lens_big[] = {101};
  a.maybe_kv_lens = lens_big;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("kv_lens[0] = 101"));
  a = f.a; a.softmax_scale = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("softmax_scale = inf"));
  REQUIRE_THROWS_WITH(attention(context<cpu>{-1}, f.w, f.a), Contains("num_threads = -1"));
  std::vector<unsigned char> ws(16);
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, f.a, ws.data(), ws.size()), Contains("workspace_bytes = 16"));
  REQUIRE_THROWS_WITH(attention_reference(f.w, f.a, 50, 20), Contains("rows [50, 20)"));
}

TEST_CASE("outputs that overlap inputs are rejected", "[attention][errors][cpu]") {
  fixture f;
  auto a = f.a;
  a.o = const_cast<float*>(a.q);
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("either o aliases q (in-place attention is not supported)"));
  // Sizes far beyond the buffers: the message says so (it used to speak only of in-place attention).
  a = f.a;
  a.batch = 1 << 20;
  a.seq = 1 << 20;
  a.q_strides = a.k_strides = a.v_strides = a.o_strides = packed_strides(a.seq, a.heads, a.head_dim);
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("batch = 1048576, seq = 1048576") &&
                                                    Contains("or the sizes are larger than the buffers"));
  a = f.a;
  a.maybe_lse = const_cast<float*>(a.v) + 5;
  REQUIRE_THROWS_WITH(attention(f.ctx, f.w, a), Contains("maybe_lse overlaps v"));
  a = f.a;
  a.o_strides.seq = std::int64_t(1) << 62;  // a product of strides past 2^63 is caught, not wrapped
  a.o_strides.batch = std::int64_t(1) << 62;
  REQUIRE_THROWS_AS(attention(f.ctx, f.w, a), drdiff::error);
}

TEST_CASE("a global list cannot take a sqrt cap, and the cap cannot be negative", "[attention][errors][cpu]") {
  fixture f;
  int const list[] = {1, 2};
  auto g = attn::global_tokens::explicit_list(list, 2);
  g.spec.sqrt_cap = 8;
  REQUIRE_THROWS_WITH(attention(f.ctx, g, f.a), Contains("sqrt_cap = 8"));
  REQUIRE_THROWS_WITH(attention(f.ctx, attn::global_tokens::first_sqrt(-3), f.a), Contains("-3"));
}

TEST_CASE("a NaN in q, k or v reaches the output and the lse, never a plausible number", "[attention][errors][cpu]") {
  using namespace drdiff::attn;
  for (int which = 0; which < 3; ++which) {
    test::problem<float> p{1, 300, 2, 64, test::fresh_seed()};
    int const row = 150;
    float* t = which == 0 ? p.q.data() : which == 1 ? p.k.data() : p.v.data();
    t[std::size_t(row) * p.stride_seq() + 5] = std::nanf("");  // head 0 of token `row`
    auto a = p.args();
    a.maybe_lse = p.lse.data();
    attention(context<cpu>{2}, local_window{16} | global_tokens::first(4), a);
    INFO("NaN in " << "qkv"[which] << " at token " << row);
    auto o = [&](int i, int d) { return p.o[std::size_t(i) * p.stride_seq() + d]; };
    auto lse = [&](int h, int i) { return p.lse[std::size_t(h) * p.seq + i]; };
    // The row itself (q) or every row that attends token `row` (k, v: rows within the window and the
    // global rows) is NaN in head 0; rows of other tiles that do not attend it stay finite, and head 1
    // is untouched. (A NaN in v can also reach rows of its own 64-row tile that do not attend it: the
    // masked score is an exact 0, and 0·NaN is NaN. Over-reported, never hidden: docs/architecture.md.)
    CHECK(std::isnan(o(row, 5)));  // element 5 of head 0: where a NaN in v sits
    if (which == 0) CHECK(std::isnan(lse(0, row)));
    if (which == 1) {
      CHECK(std::isnan(lse(0, row - 16)));
      CHECK(std::isnan(lse(0, 0)));  // a global row attends every key
    }
    CHECK(std::isnan(o(which == 0 ? row : row + 16, 5)));
    CHECK(std::isfinite(o(row + 60, 5)));
    CHECK(std::isfinite(lse(0, row + 60)));
    CHECK(std::isfinite(o(row, 64)));
    CHECK(std::isfinite(lse(1, row)));
  }
}

TEST_CASE("a worker count above the hardware's is capped, and 0 means the hardware's", "[attention][threads][cpu]") {
  int const hw = std::max(1, int(std::thread::hardware_concurrency()));
  CHECK(detail::resolve_threads(0) == hw);
  CHECK(detail::resolve_threads(1000) == hw);
  CHECK(detail::resolve_threads(1) == 1);
  // The same bytes whatever the count asked for.
  test::problem<float> p{1, 200, 2, 64, test::fresh_seed()};
  auto a = p.args();
  attention(context<cpu>{1}, attn::local_window{16}, a);
  auto const one = p.o;
  attention(context<cpu>{1000}, attn::local_window{16}, a);
  CHECK(p.o == one);
}
