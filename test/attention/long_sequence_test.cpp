// HSA at N = 262144 (one head, D = 64) runs with O(N) memory and matches the reference on sampled
// rows: the first rows (global), rows in the middle, and the last rows.

#include <catch2/catch.hpp>

#include "../support/drdiff_test.hpp"

using namespace drdiff;

TEST_CASE("hsa at N = 262144 runs without an N x N buffer and matches the reference",
          "[attention][hsa][long][cpu]") {
  int const n = 262144, d = 64;
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  test::problem<float> p(1, n, 1, d, seed);
  attn::hsa const h{};
  auto a = p.args();
  context<cpu> const ctx{};
  std::size_t const ws = attention_workspace_bytes(ctx, h, a);
  // Linear in N: two floats of state per row plus per-thread tiles; an N×N buffer would be 256 GiB.
  REQUIRE(ws < std::size_t(4) * n * sizeof(float) + (std::size_t(64) << 20));
  attention(ctx, h, a);
  std::vector<float> o_ref, lse_ref;
  auto r = p.args_into(o_ref, lse_ref);
  for (auto [r0, r1] : {std::pair{0, 160}, std::pair{131000, 131100}, std::pair{n - 100, n}}) {
    attention_reference(h, r, r0, r1);
    double lse_err = 0;
    double const err = test::max_rel_error(p, o_ref, lse_ref, r0, r1, &lse_err);
    INFO("rows [" << r0 << ", " << r1 << "): error " << err << ", lse error " << lse_err);
    REQUIRE(err <= 1e-5);
    REQUIRE(lse_err <= 1e-5);
  }
}
