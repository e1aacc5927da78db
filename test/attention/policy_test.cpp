// Host-only property tests of the attention policies: the enumeration (segments and blocks) visits
// exactly the keys the mask allows, each once.

#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/policies.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <functional>
#include <climits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "../support/drdiff_test.hpp"
#include "../support/user_policies.hpp"

using namespace drdiff;
using attn::index_range;

namespace {

// Plain checks for the inner loops (a Catch assertion per pair would dominate the run time).
#define EXPECT(cond)                                         \
  do {                                                       \
    if (!(cond)) FAIL("expected " #cond " (line " << __LINE__ << ")"); \
  } while (0)

std::string describe(attn::pattern const& p, int tile = 64) {
  std::ostringstream os;
  os << "n=" << p.n << " dense=" << p.is_dense << " w=" << p.window << " dil={";
  for (int c = 0; c < p.num_dilations; ++c) os << "(" << p.dil[c].rate << "," << p.dil[c].span << ")";
  os << "} rule=" << int(p.rule) << " G=" << p.num_global << " gstride=" << p.global_stride << " tile=" << tile;
  return os.str();
}

/// Segment path: every allowed pair exactly once, nothing else; tiles and segments well formed.
/// Returns the fraction of allowed pairs that sit in exact segments.
template <class S>
double check_segments(S const& seg, int n, std::function<bool(int, int)> const& mask) {
  std::vector<unsigned char> seen(std::size_t(n) * n, 0);
  std::size_t exact_pairs = 0, allowed = 0;
  for (int p = 0; p < seg.num_passes(); ++p) {
    std::vector<unsigned char> row_used(n, 0);
    for (int t = 0; t < seg.num_q_tiles(p); ++t) {
      index_range const rows = seg.q_tile(p, t);
      for (int r = 0; r < rows.count; ++r) {
        EXPECT(rows[r] >= 0);
        EXPECT(rows[r] < n);
        EXPECT(row_used[rows[r]] == 0);  // tiles of one pass are disjoint
        row_used[rows[r]] = 1;
        if (r > 0) EXPECT(rows[r] > rows[r - 1]);
      }
      int last_key = -1;
      seg.for_each_segment(p, t, [&](index_range keys, bool exact) {
        EXPECT(keys.count > 0);
        if constexpr (attn::detail::has_row_mask<S, int>::value) {  // the row form agrees with owns()
          std::vector<int> keep(keys.count);
          for (int r = 0; r < rows.count; ++r) {
            seg.row_mask(p, rows[r], keys, keep.data());
            for (int c = 0; c < keys.count; ++c) EXPECT(keep[c] == (seg.owns(p, rows[r], keys[c]) ? 1 : 0));
          }
        }
        for (int c = 0; c < keys.count; ++c) {
          int const j = keys[c];
          EXPECT(j > last_key);  // increasing and disjoint across segments
          EXPECT(j < n);
          last_key = j;
          for (int r = 0; r < rows.count; ++r) {
            int const i = rows[r];
            bool const own = seg.owns(p, i, j);
            if constexpr (attn::has_capabilities_v<S>) {  // the capabilities the kernels use agree
              auto const view = attn::pass_view(seg, p);
              attn::pass_traits const tr = view.traits(seg);
              if (view.live_row(seg, i)) {
                EXPECT(view.owns_key(seg, i, j) == own);
                int const d = std::abs(i - j);
                if (tr.has_band()) EXPECT(own == (d >= tr.band_lo && d <= tr.band_hi));
                if (tr.key_tail && p > 0) EXPECT(attn::pass_view(seg, p - 1).tail().owns_key(seg, i, j) == own);
              } else {
                EXPECT(!own);
              }
              if (tr.dense || tr.key_split) EXPECT(exact);
              if (tr.one_run)
                EXPECT(rows.stride == 1 && !rows.list && j >= rows.start - tr.band_hi && j <= rows[rows.count - 1] + tr.band_hi);
            }
            if (exact) EXPECT(own);
            if (own) {
              EXPECT(mask(i, j));
              EXPECT(seen[std::size_t(i) * n + j] == 0);
              seen[std::size_t(i) * n + j] = 1;
              if (exact) ++exact_pairs;
            }
          }
        }
      });
    }
  }
  if constexpr (attn::has_tail_segment_v<S>) {  // a key-tail pass's segment for the rows of pass − 1's tiles
    for (int p = 1; p < seg.num_passes(); ++p) {
      if (!attn::traits_of(seg, p).key_tail) continue;
      for (int t = 0; t < seg.num_q_tiles(p - 1); ++t) {
        index_range const rows = seg.q_tile(p - 1, t);
        if (rows.empty()) continue;
        std::vector<unsigned char> in_tail(n, 0), exact_key(n, 0);
        seg.tail_segment(p, rows, [&](index_range keys, bool exact) {
          for (int c = 0; c < keys.count; ++c) {
            in_tail[keys[c]] = 1;
            exact_key[keys[c]] = exact ? 1 : 0;
          }
        });
        for (int r = 0; r < rows.count; ++r)
          for (int j = 0; j < n; ++j) {
            bool const own = seg.owns(p, rows[r], j);
            if (own) EXPECT(in_tail[j]);
            if (exact_key[j]) EXPECT(own);
          }
      }
    }
  }
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      bool const m = mask(i, j);
      allowed += m;
      if (m != bool(seen[std::size_t(i) * n + j])) {
        INFO("pair (" << i << ", " << j << ") mask=" << m << " visited=" << int(seen[std::size_t(i) * n + j]));
        EXPECT(false);
      }
    }
  return allowed ? double(exact_pairs) / double(allowed) : 1.0;
}

/// Block path: blocks increase, cover every allowed pair, and full_block is truthful.
template <class P>
void check_blocks(P const& p, int n) {
  int const nqb = (n + P::block_q - 1) / P::block_q, nkb = (n + P::block_k - 1) / P::block_k;
  for (int qb = 0; qb < nqb; ++qb) {
    std::vector<unsigned char> listed(nkb, 0);
    int prev = -1;
    for (int x = 0; x < p.num_kv_blocks(qb); ++x) {
      int const kb = p.kv_block(qb, x);
      EXPECT(kb > prev);
      EXPECT(kb < nkb);
      prev = kb;
      listed[kb] = 1;
    }
    for (int kb = 0; kb < nkb; ++kb) {
      bool any = false, all = true;
      for (int i = qb * P::block_q; i < std::min(n, (qb + 1) * P::block_q); ++i)
        for (int j = kb * P::block_k; j < std::min(n, (kb + 1) * P::block_k); ++j) {
          bool const m = p.mask(i, j);
          any |= m;
          all &= m;
        }
      if (any) EXPECT(listed[kb]);
      if (p.full_block(qb, kb)) EXPECT(all);
    }
  }
}

struct random_config {
  attn::sparse_union u;
  std::vector<int> list;
  std::vector<int> head_rates;
};

random_config make_random(std::mt19937_64& rng, int n) {
  random_config cfg;
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  attn::sparse_union& u = cfg.u;
  u.dense = pick(0, 15) == 0;
  u.has_window = pick(0, 3) != 0;
  u.window = u.has_window ? pick(0, std::max(1, n / 3)) : 0;
  u.num_dilations = pick(0, 2);
  for (int c = 0; c < u.num_dilations; ++c) {
    u.dil[c].rate = pick(1, 9);
    u.dil[c].span = (u.has_window ? u.window : 0) + pick(0, n);
  }
  int const rule = pick(0, 3);
  int const g = pick(0, std::min(n, 12));
  if (rule == 1) u.globals = attn::global_tokens::first(pick(0, 4) == 0 ? n : g).spec;
  if (rule == 2) u.globals = attn::global_tokens::strided(std::max(1, g)).spec;
  if (rule == 3) {
    for (int i = 0; i < n; ++i)
      if (pick(0, n) < g) cfg.list.push_back(i);
    u.globals = attn::global_tokens::explicit_list(cfg.list.data(), int(cfg.list.size())).spec;
  }
  return cfg;
}

}  // namespace

TEST_CASE("random unions: segments and blocks visit exactly the allowed keys, each once",
          "[attention][policy][property][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  int const configs = 2500;
  for (int it = 0; it < configs; ++it) {
    int const n = std::uniform_int_distribution<int>(1, it % 10 == 0 ? 300 : 140)(rng);
    random_config cfg = make_random(rng, n);
    REQUIRE_NOTHROW(cfg.u.validate(n, 1));
    attn::pattern const p = cfg.u.bind(n, 0);
    int const tile = std::array<int, 4>{1, 5, 16, 64}[it % 4];
    INFO(describe(p, tile));
    check_segments(p.tiles(tile), n, [&](int i, int j) { return p.mask(i, j); });
    check_blocks(p, n);
  }
}

TEST_CASE("the mask is the definition: window, dilation and globals", "[attention][policy][cpu]") {
  int const n = 100;
  int const list[] = {3, 50, 97};
  auto const u = attn::local_window{2} | attn::dilated{5, 20} | attn::global_tokens::explicit_list(list, 3);
  REQUIRE_NOTHROW(u.validate(n, 1));
  attn::pattern const p = u.bind(n, 0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j) {
      int const d = std::abs(i - j);
      bool const g = i == 3 || i == 50 || i == 97 || j == 3 || j == 50 || j == 97;
      bool const expect = d <= 2 || (d <= 20 && d % 5 == 0) || g;
      REQUIRE(p.mask(i, j) == expect);
    }
  auto const s = attn::global_tokens::strided(4).bind(10, 0);  // stride ⌊10/4⌋ = 2: 0, 2, 4, 6
  std::vector<int> globals;
  for (int i = 0; i < 10; ++i)
    if (s.is_global(i)) globals.push_back(i);
  REQUIRE(globals == std::vector<int>{0, 2, 4, 6});
}

TEST_CASE("hsa picks its tier from N at run time", "[attention][policy][hsa][cpu]") {
  attn::hsa const h{};
  REQUIRE(h.bind(1024, 0).is_dense);
  auto const t2 = h.bind(1025, 0);
  REQUIRE_FALSE(t2.is_dense);
  REQUIRE(t2.window == 256);
  REQUIRE(t2.dil[0].rate == 2);
  REQUIRE(t2.dil[0].span == 1024);
  REQUIRE(t2.num_global == 33);  // ⌈√1025⌉
  REQUIRE(h.bind(4096, 0).num_global == 64);
  REQUIRE(h.bind(2000, 0).num_global == 45);  // ⌈√2000⌉ = 45
  auto const t3 = h.bind(4097, 0);
  REQUIRE(t3.dil[0].rate == 4);
  REQUIRE(t3.dil[0].span == 2048);
  REQUIRE(t3.num_global == 64);
  auto const t4 = h.bind(16385, 0);
  REQUIRE(t4.dil[0].rate == 8);
  REQUIRE(t4.dil[0].span == 4096);
  REQUIRE(t4.num_global == 128);
  REQUIRE(h.bind(1 << 20, 0).dil[0].rate == 8);
}

TEST_CASE("every default hsa tier: exact enumeration, and most pairs in exact segments",
          "[attention][policy][hsa][cpu]") {
  attn::hsa const h{};
  for (int n : {700, 1024, 1500, 4096, 5000}) {
    attn::pattern const p = h.bind(n, 0);
    INFO(describe(p));
    double const exact = check_segments(p.tiles(64), n, [&](int i, int j) { return p.mask(i, j); });
    check_blocks(p, n);
    // Masks are evaluated only on tile edges: at least 60% of the allowed pairs need none.
    REQUIRE(exact > 0.6);
  }
}

TEST_CASE("per-head dilation binds a different rate per head", "[attention][policy][dilated][cpu]") {
  int const rates[] = {1, 2, 4, 8};
  attn::dilated const d{2, 64, rates};
  REQUIRE_NOTHROW(d.validate(500, 4));
  for (int h = 0; h < 4; ++h) {
    attn::pattern const p = d.bind(500, h);
    REQUIRE(p.dil[0].rate == rates[h]);
    check_segments(p.tiles(16), 500, [&](int i, int j) { return std::abs(i - j) <= 64 && (i - j) % rates[h] == 0; });
  }
}

using test::documents;

TEST_CASE("bound patterns compare equal exactly when they are the same pattern", "[attention][policy][cpu]") {
  int const rates[] = {1, 2, 2};
  attn::dilated const d{2, 64, rates};
  REQUIRE(d.bind(500, 1) == d.bind(500, 2));  // the same rate: one pattern, shared between the heads
  REQUIRE(d.bind(500, 0) != d.bind(500, 1));
  REQUIRE(d.bind(500, 1).tiles(64) == d.bind(500, 2).tiles(64));
  REQUIRE(d.bind(500, 1).tiles(64) != d.bind(500, 1).tiles(128));
  attn::hsa const h{};
  REQUIRE(h.bind(5000, 0) == h.bind(5000, 3));
  REQUIRE(h.bind(5000, 0) != h.bind(5001, 0));
  REQUIRE(attn::same_pattern(h.bind(5000, 0).tiles(64), h.bind(5000, 1).tiles(64)));
  REQUIRE_FALSE(attn::same_pattern(attn::segments_of(documents{}, 64), attn::segments_of(documents{}, 64)));  // no ==
  static_assert(attn::head_independent_v<documents> && !attn::head_independent_v<attn::hsa>);
}

TEST_CASE("user segment policies with capabilities: segments, blocks and capabilities agree with the mask",
          "[attention][policy][capabilities][cpu]") {
  static_assert(attn::has_capabilities_v<test::user_window> && !attn::has_capabilities_v<test::user_window_plain>);
  static_assert(attn::has_capabilities_v<test::user_sink_window> && attn::has_tail_segment_v<test::user_sink_window>);
  static_assert(attn::has_capabilities_v<attn::tiled_pattern>);
  for (int n : {1, 7, 64, 65, 200, 333})
    for (int w : {0, 3, 64, 100}) {
      INFO("n " << n << " w " << w);
      auto const uw = test::user_window{w}.bind(n, 0);
      REQUIRE(attn::traits_of(uw, 0).one_run);
      check_segments(uw, n, [&](int i, int j) { return uw.mask(i, j); });
      check_blocks(uw, n);
      auto const plain = test::user_window_plain{w}.bind(n, 0);
      REQUIRE_FALSE(attn::traits_of(plain, 0).one_run);
      check_segments(plain, n, [&](int i, int j) { return plain.mask(i, j); });
      for (int sinks : {1, 5, 70}) {
        INFO("sinks " << sinks);
        auto const sw = test::user_sink_window{w, sinks}.bind(n, 0);
        REQUIRE(attn::traits_of(sw, 1).key_tail);
        check_segments(sw, n, [&](int i, int j) { return sw.mask(i, j); });
        check_blocks(sw, n);
      }
    }
  REQUIRE(attn::same_pattern(test::user_window{4}.bind(100, 0), test::user_window{4}.bind(100, 1)));
  REQUIRE_FALSE(attn::same_pattern(test::user_window{4}.bind(100, 0), test::user_window{5}.bind(100, 0)));
  REQUIRE_FALSE(attn::same_pattern(test::user_window_plain{4}.bind(100, 0), test::user_window_plain{4}.bind(100, 0)));
}

TEST_CASE("a block-path policy is presented as one segment pass", "[attention][policy][block][cpu]") {
  static_assert(attn::is_policy_v<documents>);
  static_assert(!attn::has_segments_v<documents>);
  static_assert(attn::has_segments_v<attn::hsa>);
  static_assert(attn::is_policy_v<attn::hsa>);
  for (int n : {1, 31, 32, 33, 200}) {
    documents const d{};
    auto const seg = attn::segments_of(d, n);
    check_segments(seg, n, [&](int i, int j) { return d.mask(i, j); });
    check_blocks(d, n);
  }
}

TEST_CASE("allowed_pairs counts what the mask allows", "[attention][policy][density][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  std::mt19937_64 rng(seed);
  for (int it = 0; it < 200; ++it) {
    int const n = std::uniform_int_distribution<int>(1, 200)(rng);
    random_config cfg = make_random(rng, n);
    attn::pattern const p = cfg.u.bind(n, 0);
    int const kv_len = std::uniform_int_distribution<int>(1, n)(rng);
    std::int64_t brute = 0, brute_kv = 0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        brute += p.mask(i, j);
        brute_kv += p.mask(i, j) && j < kv_len;
      }
    REQUIRE(attn::allowed_pairs(cfg.u, n) == brute);
    REQUIRE(attn::allowed_pairs(cfg.u, n, 1, kv_len) == brute_kv);
  }
  REQUIRE(attn::density(attn::dense{}, 77) == 1.0);
}
