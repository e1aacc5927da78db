// The index arithmetic of sequence-parallel attention (attention/distributed.hpp) against the
// pattern's own mask: each rank's halo is exactly the keys outside its chunk that its non-global
// query rows attend, no more; chunks partition the sequence; runs name the right owners.

#include <drdiff/attention/distributed.hpp>
#include <drdiff/attention/policies.hpp>

#include <catch2/catch.hpp>

#include <climits>
#include <random>
#include <set>
#include <vector>

#include "../support/user_policies.hpp"

using namespace drdiff;

namespace {

/// Brute force: every key outside [begin, end) that a non-global row of the chunk attends, any head.
template <class Policy>
std::vector<int> needed_keys(Policy const& policy, int n, int heads, int begin, int end) {
  std::set<int> keys;
  for (int h = 0; h < heads; ++h) {
    auto const p = attn::bind(policy, n, h);
    for (int i = begin; i < end; ++i) {
      if (p.is_global(i)) continue;
      for (int j = 0; j < n; ++j)
        if ((j < begin || j >= end) && p.mask(i, j)) keys.insert(j);
    }
  }
  return {keys.begin(), keys.end()};
}

template <class Policy>
void check_all_ranks(Policy const& policy, int n, int heads, int ranks) {
  INFO("N " << n << " heads " << heads << " ranks " << ranks);
  std::size_t total = 0;
  for (int r = 0; r < ranks; ++r) {
    auto const c = attn::sequence_chunk(n, ranks, r);
    INFO("rank " << r << " chunk [" << c.begin << ", " << c.end << ")");
    auto const got = attn::halo_keys(policy, n, heads, c.begin, c.end);
    CHECK(got == needed_keys(policy, n, heads, c.begin, c.end));
    total += std::size_t(c.size());
    // The runs cover the halo in order, each inside its owner's chunk.
    auto const runs = attn::halo_runs(got, n, ranks);
    std::vector<int> flat;
    for (auto const& run : runs) {
      auto const owner = attn::sequence_chunk(n, ranks, run.rank);
      CHECK(run.rank != r);
      CHECK(run.start >= owner.begin);
      CHECK(run.start + run.count <= owner.end);
      for (int x = 0; x < run.count; ++x) flat.push_back(run.start + x);
    }
    CHECK(flat == got);
  }
  CHECK(total == std::size_t(n));
}

}  // namespace

TEST_CASE("chunks partition the sequence and chunk_owner finds them", "[attention][distributed][cpu]") {
  for (int n : {1, 7, 64, 1000, 1001}) {
    for (int ranks = 1; ranks <= std::min(n, 9); ++ranks) {
      int next = 0;
      for (int r = 0; r < ranks; ++r) {
        auto const c = attn::sequence_chunk(n, ranks, r);
        CHECK(c.begin == next);
        CHECK((c.size() == n / ranks || c.size() == n / ranks + 1));
        for (int j = c.begin; j < c.end; ++j) REQUIRE(attn::chunk_owner(n, ranks, j) == r);
        next = c.end;
      }
      CHECK(next == n);
    }
  }
  CHECK_THROWS_WITH(attn::sequence_chunk(10, 11, 0), Catch::Matchers::Contains("ranks = 11"));
  CHECK_THROWS_WITH(attn::sequence_chunk(10, 2, 2), Catch::Matchers::Contains("rank = 2"));
}

TEST_CASE("each rank's halo is exactly the keys its non-global rows attend", "[attention][distributed][cpu]") {
  int const rates[] = {1, 3, 8, 5};
  int const list[] = {0, 17, 18, 300, 701};
  for (int ranks : {1, 2, 3, 4, 7}) {
    check_all_ranks(attn::local_window{16}, 500, 1, ranks);
    check_all_ranks(attn::dilated{4, 100}, 533, 1, ranks);
    check_all_ranks(attn::dilated{3, 90, rates}, 400, 4, ranks);  // per-head rates: the union over heads
    check_all_ranks(attn::local_window{12} | attn::dilated{5, 140} | attn::global_tokens::first(9), 611, 2, ranks);
    check_all_ranks(attn::local_window{8} | attn::global_tokens::strided(13), 620, 1, ranks);
    check_all_ranks(attn::local_window{4} | attn::dilated{7, 60} | attn::dilated{2, 30} |
                        attn::global_tokens::explicit_list(list, 5), 750, 1, ranks);
    check_all_ranks(attn::dense{}, 130, 1, ranks);
    check_all_ranks(attn::global_tokens::first(5), 90, 1, ranks);
  }
  // Chunks narrower than the window and the span: the halo reaches past the next rank.
  check_all_ranks(attn::local_window{40} | attn::dilated{6, 150}, 160, 1, 16);
  // Every hsa tier of a small table, and the default table's first sparse tier.
  auto const small = test::small_tiers();
  for (int n : {50, 200, 500, 1200}) check_all_ranks(small, n, 2, 3);
  check_all_ranks(attn::hsa{}, 2048, 1, 2);
}

TEST_CASE("the halo of a long hsa sequence is a small part of what ring attention moves",
          "[attention][distributed][cpu]") {
  // N = 1M, the default table's last tier (w 256, δ 8 to 4096, 128 global tokens), 16 heads of 64,
  // bf16: rank 0 of 2 receives its right neighbour's 4096 nearest keys and no more (the global keys
  // are its own), against half the sequence for ring attention.
  int const n = 1 << 20, ranks = 2, heads = 16;
  auto const c = attn::sequence_chunk(n, ranks, 0);
  auto const keys = attn::halo_keys(attn::hsa{}, n, heads, c.begin, c.end);
  CHECK(keys.size() == 4096);
  CHECK(keys.front() == c.end);
  auto const t = attn::traffic(keys.size(), c.size(), n, heads, 64, 2);
  CHECK(t.halo_bytes == 4096LL * 2 * heads * 64 * 2);
  CHECK(t.ring_bytes == (n / 2) * 2LL * heads * 64 * 2);
  // Rank 1 also needs the 128 global keys that rank 0 holds.
  auto const c1 = attn::sequence_chunk(n, ranks, 1);
  auto const k1 = attn::halo_keys(attn::hsa{}, n, heads, c1.begin, c1.end);
  CHECK(k1.size() == 4096 + 128);
  // An interior rank of 8: both neighbours' 4096 nearest keys and the global keys.
  auto const c3 = attn::sequence_chunk(n, 8, 3);
  auto const k3 = attn::halo_keys(attn::hsa{}, n, heads, c3.begin, c3.end);
  CHECK(k3.size() == 2 * 4096 + 128);
  CHECK(attn::traffic(k3.size(), c3.size(), n, heads, 64, 2).ring_bytes == 917504LL * 2 * heads * 64 * 2);
}

TEST_CASE("halo_keys refuses a chunk outside the sequence", "[attention][distributed][errors][cpu]") {
  auto const p = attn::bind(attn::local_window{4}, 100, 0);
  CHECK_THROWS_WITH(attn::halo_keys(p, 50, 50), Catch::Matchers::Contains("[50, 50)"));
  CHECK_THROWS_WITH(attn::halo_keys(p, 90, 101), Catch::Matchers::Contains("n = 100"));
  CHECK_THROWS_WITH(attn::halo_runs({100}, 100, 2), Catch::Matchers::Contains("key 100"));
}
