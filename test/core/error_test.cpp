#include <drdiff/core/error.hpp>
#include <drdiff/attention/index_range.hpp>

#include <catch2/catch.hpp>

using Catch::Matchers::Contains;

TEST_CASE("DRDIFF_CHECK throws drdiff::error with the streamed message", "[core][errors][cpu]") {
  int const value = -7;
  REQUIRE_NOTHROW([&] { DRDIFF_CHECK(value < 0, "never"); }());
  REQUIRE_THROWS_AS([&] { DRDIFF_CHECK(value > 0, "x = ", value); }(), drdiff::error);
  REQUIRE_THROWS_WITH([&] { DRDIFF_CHECK(value > 0, "x = ", value, " must be > 0"); }(),
                      Contains("drdiff: x = -7 must be > 0") && Contains("error_test.cpp"));
  REQUIRE_THROWS_AS([] { DRDIFF_FAIL("always"); }(), std::runtime_error);
}

TEST_CASE("index_range: strided, listed, sub-ranges and prefixes below a limit", "[core][cpu]") {
  drdiff::attn::index_range const s{3, 4, 5};  // 3 7 11 15 19
  REQUIRE(s[4] == 19);
  REQUIRE(s.count_below(3) == 0);
  REQUIRE(s.count_below(4) == 1);
  REQUIRE(s.count_below(19) == 4);
  REQUIRE(s.count_below(100) == 5);
  REQUIRE(s.sub(2, 2)[0] == 11);
  int const list[] = {1, 4, 9, 16};
  drdiff::attn::index_range const l{0, 1, 4, list};
  REQUIRE(l.count_below(9) == 2);
  REQUIRE(l.count_below(17) == 4);
  REQUIRE(l.sub(1, 2)[1] == 9);
  REQUIRE(drdiff::attn::contiguous(5, 2).empty());
}
