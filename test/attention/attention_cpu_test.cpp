// The CPU fast path against the float64 reference, on fresh random inputs, for every policy and
// every HSA tier.

#include <catch2/catch.hpp>

#include <climits>
#include <random>

#include "../support/drdiff_test.hpp"
#include "../support/user_policies.hpp"

using namespace drdiff;

namespace {

template <class T>
constexpr double tolerance() { return std::is_same_v<T, float> ? 1e-5 : 1e-11; }

/// Runs the fast path and the reference on the same fresh problem and compares rows [r0, r1)
/// (all rows when r1 < 0).
template <class T, class Policy>
void compare(Policy const& policy, int batch, int n, int heads, int dim, bool padded = false, int row_pad = 0,
             int r0 = 0, int r1 = -1, int threads = 2) {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed << " batch " << batch << " N " << n << " heads " << heads << " D " << dim
               << " padded " << padded << " row_pad " << row_pad);
  test::problem<T> p(batch, n, heads, dim, seed, row_pad);
  if (padded) {
    std::mt19937_64 rng(seed + 1);
    for (int b = 0; b < batch; ++b) p.kv_lens.push_back(std::uniform_int_distribution<int>(1, n)(rng));
    p.kv_lens[0] = n;
  }
  std::vector<T> o_ref, lse_ref;
  auto ref_args = p.args_into(o_ref, lse_ref);
  if (r1 < 0) r1 = n;
  attention_reference(policy, ref_args, r0, r1);
  attention(context<cpu>{threads}, policy, p.args());
  double lse_err = 0;
  double const err = test::max_rel_error(p, o_ref, lse_ref, r0, r1, &lse_err);
  INFO("relative error " << err << ", lse error " << lse_err);
  REQUIRE(err <= tolerance<T>());
  REQUIRE(lse_err <= tolerance<T>());
}


}  // namespace

TEMPLATE_TEST_CASE("dense attention matches the reference", "[attention][dense][cpu]", float, double) {
  compare<TestType>(attn::dense{}, 2, 200, 3, 64);
  compare<TestType>(attn::dense{}, 1, 1, 1, 32);
  compare<TestType>(attn::dense{}, 1, 129, 2, 256, false, 8);
}

TEMPLATE_TEST_CASE("local window attention matches the reference", "[attention][local][cpu]", float, double) {
  compare<TestType>(attn::local_window{16}, 2, 300, 2, 64);
  compare<TestType>(attn::local_window{0}, 1, 77, 1, 32);     // only the diagonal
  compare<TestType>(attn::local_window{500}, 1, 130, 2, 64);  // N < w: dense
  compare<TestType>(attn::local_window{256}, 1, 1000, 1, 128);
}

TEMPLATE_TEST_CASE("dilated attention matches the reference", "[attention][dilated][cpu]", float, double) {
  compare<TestType>(attn::dilated{4, 100}, 1, 333, 2, 64);
  compare<TestType>(attn::dilated{1, 20}, 1, 150, 1, 32);  // δ = 1 is a window
  compare<TestType>(attn::dilated{7, 1000}, 2, 257, 1, 96);
  int const rates[] = {1, 3, 8};
  compare<TestType>(attn::dilated{2, 90, rates}, 1, 211, 3, 64);  // per-head dilation
}

TEMPLATE_TEST_CASE("global-token attention matches the reference", "[attention][global][cpu]", float, double) {
  compare<TestType>(attn::global_tokens::first(5), 1, 100, 2, 64);
  compare<TestType>(attn::global_tokens::strided(7), 1, 100, 1, 64);
  int const list[] = {0, 13, 14, 60, 99};
  compare<TestType>(attn::global_tokens::explicit_list(list, 5), 2, 100, 1, 32);
  compare<TestType>(attn::global_tokens::first(70), 1, 70, 1, 64);  // G = N: every token global
}

TEMPLATE_TEST_CASE("unions count each key once", "[attention][union][cpu]", float, double) {
  int const list[] = {2, 40, 41, 200};
  // Overlapping window, two dilations and globals inside the window.
  auto const u = attn::local_window{12} | attn::dilated{3, 60} | attn::dilated{5, 100} |
                 attn::global_tokens::explicit_list(list, 4);
  compare<TestType>(u, 2, 257, 2, 64);
  compare<TestType>(attn::local_window{8} | attn::global_tokens::strided(9), 1, 190, 2, 64, true);
  compare<TestType>(attn::local_window{8} | attn::dense{}, 1, 100, 1, 32);
  compare<TestType>(attn::local_window{40} | attn::dilated{4, 40} | attn::global_tokens::first(3), 1, 150, 1, 64);
}

TEMPLATE_TEST_CASE("every hsa tier matches the reference", "[attention][hsa][cpu]", float, double) {
  auto const h = test::small_tiers();
  for (int n : {40, 64, 65, 200, 256, 500, 601, 1111}) compare<TestType>(h, 1, n, 2, 64);
  compare<TestType>(h, 3, 700, 2, 64, true, 24);  // padded batch, explicit row strides
}

TEST_CASE("the default hsa tiers match the reference", "[attention][hsa][cpu]") {
  attn::hsa const h{};
  compare<float>(h, 1, 1000, 1, 64);                    // dense tier
  compare<float>(h, 1, 3000, 2, 64);                    // w=256, δ=2, s=1024, G=⌈√N⌉
  compare<float>(h, 1, 6000, 1, 64, false, 0, 0, 600);  // w=256, δ=4, s=2048, G=64
  compare<float>(h, 1, 6000, 1, 64, false, 0, 5400, 6000);
  compare<float>(h, 1, 20000, 1, 32, false, 0, 0, 200);   // w=256, δ=8, s=4096, G=128
  compare<float>(h, 1, 20000, 1, 32, false, 0, 9000, 9300);
}

TEST_CASE("padded batches mask the keys past each length", "[attention][padding][cpu]") {
  compare<float>(attn::local_window{30}, 4, 180, 2, 64, true);
  compare<float>(attn::dense{}, 3, 100, 1, 64, true);
  compare<double>(attn::global_tokens::first(10) | attn::dilated{3, 50}, 3, 150, 2, 32, true);
}

using test::documents;

TEST_CASE("a user-defined block policy runs on the same kernel", "[attention][block][cpu]") {
  compare<float>(documents{}, 2, 150, 2, 64);
  compare<double>(documents{}, 1, 64, 1, 32);
}

TEST_CASE("results do not depend on the thread count or the workspace owner", "[attention][cpu]") {
  auto const seed = test::fresh_seed();
  INFO("seed " << seed);
  attn::hsa const h{};
  test::problem<float> p(2, 1500, 2, 64, seed);
  attention(context<cpu>{1}, h, p.args());
  auto const one = p.o;
  auto a = p.args();
  std::vector<unsigned char> ws(attention_workspace_bytes(context<cpu>{2}, h, a));
  attention(context<cpu>{2}, h, a, ws.data(), ws.size());
  REQUIRE(one == p.o);  // bit-identical: each row is reduced in one fixed order
}

TEST_CASE("head_dim 32 to 256 in steps of 8 run", "[attention][cpu]") {
  for (int d : {32, 40, 72, 128, 200, 256}) compare<float>(attn::local_window{10} | attn::dilated{2, 20}, 1, 90, 1, d);
}

TEST_CASE("huge windows, spans and rates are clamped to N without changing the mask", "[attention][cpu]") {
  compare<float>(attn::local_window{INT_MAX}, 1, 70, 1, 32);  // = dense
  compare<float>(attn::dilated{INT_MAX, INT_MAX}, 1, 70, 1, 32);  // = the diagonal
  compare<float>(attn::local_window{3} | attn::dilated{5, INT_MAX} | attn::global_tokens::strided(4), 1, 99, 1, 32);
  int const rates[] = {1 << 30, 3};
  compare<double>(attn::dilated{2, 1 << 30, rates}, 1, 64, 2, 32);
}

namespace {
/// A segment-path user policy whose tiles are taller than the CPU kernel's scratch (200 rows):
/// every query attends keys within 10 positions, one pass, one masked segment per tile.
struct tall_tiles {
  static constexpr int block_q = 200, block_k = 200;
  int n = 0;
  bool mask(int q, int k) const { return q - k <= 10 && k - q <= 10; }
  int num_kv_blocks(int) const { return 1; }
  int kv_block(int qb, int) const { return qb; }
  bool full_block(int, int) const { return false; }
  tall_tiles bind(int len, int) const { return {len}; }
  int num_passes() const { return 1; }
  int num_q_tiles(int) const { return (n + 199) / 200; }
  attn::index_range q_tile(int, int t) const { return attn::contiguous(t * 200, std::min(n, t * 200 + 200)); }
  bool owns(int, int q, int k) const { return mask(q, k); }
  template <class F>
  void for_each_segment(int, int t, F&& f) const {
    f(attn::contiguous(std::max(0, t * 200 - 10), std::min(n, t * 200 + 210)), false);
  }
};
}  // namespace

TEST_CASE("a user segment policy with tiles taller than the scratch runs in slices", "[attention][cpu]") {
  static_assert(attn::has_segments_v<tall_tiles>);
  compare<float>(tall_tiles{}, 2, 450, 2, 64);
}
