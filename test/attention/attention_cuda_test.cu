// CUDA attention against the float64 reference (computed on the host from the same rounded
// inputs), for every policy and tier, in bf16, fp16 and fp32. Outputs are poisoned before each run.

#include <drdiff/cuda.cuh>
#include <drdiff/cpu/attention_reference.hpp>

#include <catch2/catch.hpp>

#include <climits>
#include <cmath>
#include <random>
#include <vector>

#include "../support/device_buffer.cuh"
#include "../support/user_policies.hpp"

using namespace drdiff;

namespace {

using test::dbuf;
using test::from_float;
using test::to_float;

template <class T>
constexpr double tolerance() { return std::is_same_v<T, float> ? 1e-5 : 1e-2; }

/// Runs `policy` on the GPU and the reference on the host; compares rows [r0, r1) of every
/// (batch, head). `list` (host) is copied to the device when the policy uses an explicit global list.
template <class T, class Policy, class RefPolicy>
void compare_with(Policy const& policy, RefPolicy const& ref_policy, int batch, int n, int heads, int dim,
                  bool padded, int r0, int r1, double scale = 0.0, int short_len = 0) {
  static std::random_device rd;
  unsigned const seed = rd();
  INFO("seed " << seed << " batch " << batch << " N " << n << " heads " << heads << " D " << dim << " padded "
               << padded << " scale " << scale);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::size_t const elems = std::size_t(batch) * n * heads * dim;
  std::vector<T> hq(elems), hk(elems), hv(elems);
  std::vector<float> fq(elems), fk(elems), fv(elems);
  for (std::size_t i = 0; i < elems; ++i) {
    hq[i] = from_float<T>(nd(rng)); fq[i] = to_float(hq[i]);
    hk[i] = from_float<T>(nd(rng)); fk[i] = to_float(hk[i]);
    hv[i] = from_float<T>(nd(rng)); fv[i] = to_float(hv[i]);
  }
  std::vector<int> lens;
  if (padded) {
    for (int b = 0; b < batch; ++b)
      lens.push_back(short_len > 0 ? short_len : std::uniform_int_distribution<int>(1, n)(rng));
    lens[0] = n;
  }
  dbuf<T> dq(elems), dk(elems), dv(elems), dout(elems);
  dbuf<float> dlse(std::size_t(batch) * heads * n);
  dbuf<int> dlens(lens.size());
  dq.upload(hq); dk.upload(hk); dv.upload(hv);
  if (padded) dlens.upload(lens);
  DRDIFF_CUDA_CHECK(cudaMemset(dout.ptr, 0xff, elems * sizeof(T)));  // NaN in every type
  DRDIFF_CUDA_CHECK(cudaMemset(dlse.ptr, 0xff, dlse.n * sizeof(float)));

  auto a = make_attention_args<T>(dq.ptr, dk.ptr, dv.ptr, dout.ptr, batch, n, heads, dim);
  a.maybe_lse = reinterpret_cast<typename attention_args<T>::lse_type*>(dlse.ptr);
  a.maybe_kv_lens = padded ? dlens.ptr : nullptr;
  a.softmax_scale = scale;
  context<drdiff::cuda> const ctx{};
  std::size_t const ws_bytes = attention_workspace_bytes(ctx, policy, a);
  dbuf<unsigned char> ws(ws_bytes);
  attention(ctx, policy, a, ws.ptr, ws_bytes);
  DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  auto const out = dout.download();
  auto const lse = dlse.download();

  std::vector<float> o_ref(elems, std::nanf("")), lse_ref(dlse.n, std::nanf(""));
  auto r = make_attention_args<float>(fq.data(), fk.data(), fv.data(), o_ref.data(), batch, n, heads, dim);
  r.maybe_lse = lse_ref.data();
  r.maybe_kv_lens = padded ? lens.data() : nullptr;
  r.softmax_scale = scale;
  if (r1 < 0) r1 = n;
  attention_reference(ref_policy, r, r0, r1);

  double worst = 0, worst_lse = 0;
  for (int b = 0; b < batch; ++b)
    for (int h = 0; h < heads; ++h) {
      double diff = 0, ref = 0;
      for (int i = r0; i < r1; ++i) {
        std::size_t const base = ((std::size_t(b) * n + i) * heads + h) * dim;
        for (int d = 0; d < dim; ++d) {
          double const x = to_float(out[base + d]), y = o_ref[base + d];
          if (std::isnan(x)) {
            FAIL("NaN at batch " << b << " head " << h << " row " << i << " dim " << d);
          }
          diff = std::max(diff, std::abs(x - y));
          ref = std::max(ref, std::abs(y));
        }
        std::size_t const li = (std::size_t(b) * heads + h) * n + i;
        double const x = lse[li], y = lse_ref[li];
        if (std::isnan(x)) FAIL("lse NaN at batch " << b << " head " << h << " row " << i);
        if (!(std::isinf(x) && std::isinf(y))) worst_lse = std::max(worst_lse, std::abs(x - y) / std::max(1.0, std::abs(y)));
      }
      worst = std::max(worst, diff / std::max(ref, 1e-30));
    }
  INFO("relative error " << worst << ", lse error " << worst_lse);
  REQUIRE(worst <= tolerance<T>());
  REQUIRE(worst_lse <= tolerance<T>());
}

template <class T, class Policy>
void compare(Policy const& policy, int batch, int n, int heads, int dim, bool padded = false, int r0 = 0,
             int r1 = -1, double scale = 0.0) {
  compare_with<T>(policy, policy, batch, n, heads, dim, padded, r0, r1, scale);
}


}  // namespace

// Keys stop at kv_len = 40 while the rows run to 600: a row beyond kv_len + w sees no key, a row up
// to it sees the keys within w, however far past kv_len it is (the window's reach is not kv_len).
TEMPLATE_TEST_CASE("CUDA attention with kv_lens far below the window", "[attention][cuda]", __nv_bfloat16, float) {
  attn::local_window const local{256};
  auto const hsa_mask = attn::local_window{256} | attn::dilated{4, 1024} | attn::global_tokens::first(8);
  compare_with<TestType>(local, local, 2, 600, 2, 64, true, 0, -1, 0.0, 40);
  compare_with<TestType>(hsa_mask, hsa_mask, 2, 600, 2, 64, true, 0, -1, 0.0, 40);
}

TEMPLATE_TEST_CASE("CUDA attention matches the reference for every pattern", "[attention][cuda]", __nv_bfloat16,
                   __half, float) {
  int const d = 64;
  compare<TestType>(attn::dense{}, 2, 200, 2, d);
  compare<TestType>(attn::local_window{16}, 1, 300, 2, d);
  compare<TestType>(attn::local_window{500}, 1, 130, 1, d);  // N < w
  compare<TestType>(attn::dilated{4, 100}, 1, 333, 2, d);
  compare<TestType>(attn::dilated{1, 20}, 1, 150, 1, d);
  int const rates[] = {1, 3, 8};
  compare<TestType>(attn::dilated{2, 90, rates}, 1, 211, 3, d);  // per-head dilation
  // Per-head rates give the heads different tile counts in a pass that is not the last one.
  compare<TestType>(attn::local_window{12} | attn::dilated{2, 90, rates}, 1, 211, 3, d);
  // The same with global tokens: each head's dilated tiles carry the global keys as their tail.
  compare<TestType>(attn::local_window{12} | attn::dilated{2, 90, rates} | attn::global_tokens::strided(9), 2, 211,
                    3, d, true);
  compare<TestType>(attn::global_tokens::first(5), 1, 100, 2, d);
  compare<TestType>(attn::global_tokens::strided(7), 1, 300, 1, d);
  compare<TestType>(attn::global_tokens::first(70), 1, 70, 1, d);  // G = N
  compare<TestType>(attn::local_window{12} | attn::dilated{3, 60} | attn::dilated{5, 100} |
                        attn::global_tokens::first(4), 2, 257, 2, d);
  compare<TestType>(attn::local_window{8} | attn::global_tokens::strided(9), 3, 190, 2, d, true);
  // Global keys inside every tile's reach, run as the tail of the dilated pass, with padded batches.
  compare<TestType>(attn::local_window{8} | attn::dilated{4, 64} | attn::global_tokens::strided(9), 3, 390, 2, d,
                    true);
  compare<TestType>(test::documents{}, 2, 150, 2, d);
}

// A user's segment policy gets the kernels' fast paths by declaring capabilities
// (attention/capabilities.hpp), not by being a built-in type: the plan says which path runs, and the
// results match the reference either way.
TEMPLATE_TEST_CASE("a user's segment policy takes the paths its capabilities offer, with the reference's results",
                   "[attention][capabilities][cuda]", __nv_bfloat16, __half) {
  context<drdiff::cuda> const ctx{};
  int const n = 333, heads = 2, dim = 64;
  std::size_t const elems = std::size_t(n) * heads * dim;
  dbuf<TestType> dq(elems), dk(elems), dv(elems), dout(elems);
  auto const a = make_attention_args<TestType>(dq.ptr, dk.ptr, dv.ptr, dout.ptr, 1, n, heads, dim);

  attention_launch_info const window = describe_attention(ctx, test::user_window{16}, a);
  CHECK(window.band_kernel == (window.warps == 4));  // one run of keys per tile: the band kernel (4-warp tiles)
  CHECK(window.shared_pattern);                      // operator==: one pattern for both heads
  CHECK_FALSE(window.key_tail);
  attention_launch_info const plain = describe_attention(ctx, test::user_window_plain{16}, a);
  CHECK_FALSE(plain.band_kernel);     // the same window without capabilities: the general kernel
  CHECK_FALSE(plain.shared_pattern);  // no equality: one bound pattern per head
  // Tiles taller than the band kernel's (128 rows against 64): the capability is there, the path not.
  CHECK_FALSE(describe_attention(ctx, test::user_window_tall{16}, a).band_kernel);
  attention_launch_info const sinks = describe_attention(ctx, test::user_sink_window{16, 8}, a);
  CHECK(sinks.key_tail);  // the sink keys ride as the tail of the window's tiles
  CHECK(sinks.ordinary_passes == 1);
  CHECK_FALSE(sinks.band_kernel);
  // The built-in policies get the same paths through the same capabilities.
  CHECK(describe_attention(ctx, attn::local_window{16}, a).band_kernel == (window.warps == 4));
  attention_launch_info const builtin = describe_attention(ctx, attn::local_window{16} | attn::global_tokens::first(8), a);
  CHECK(builtin.key_tail);
  CHECK(builtin.key_splits > 0);

  compare<TestType>(test::user_window{16}, 2, n, heads, dim, true);
  compare<TestType>(test::user_window_plain{16}, 2, n, heads, dim, true);
  compare<TestType>(test::user_window_tall{16}, 2, n, heads, dim, true);
  compare<TestType>(test::user_window{200}, 1, 150, 1, 128);  // every key in reach
  compare<TestType>(test::user_sink_window{16, 8}, 2, n, heads, dim, true);
  compare<TestType>(test::user_sink_window{100, 70}, 1, 500, heads, 128);  // sinks inside the windows: masked tails
}

TEST_CASE("fp32 on CUDA runs the user's capability policies on the SIMT kernel", "[attention][capabilities][cuda]") {
  compare<float>(test::user_window{16}, 2, 200, 2, 64, true);
  compare<float>(test::user_sink_window{16, 8}, 2, 200, 2, 32, true);
}

TEMPLATE_TEST_CASE("CUDA dense attention (128-row tiles on sm_90a): head_dim 128, padded batches, odd N",
                   "[attention][cuda]", __nv_bfloat16, __half) {
  compare<TestType>(attn::dense{}, 3, 333, 2, 128, true);
  compare<TestType>(attn::dense{}, 2, 257, 3, 64, true);
}

TEMPLATE_TEST_CASE("CUDA attention with more than 16 per-head patterns (several launches of heads)",
                   "[attention][cuda]", __nv_bfloat16, float) {
  // 20 heads bind to different dilation rates: the heads run in groups of 16, each group resolving
  // its segment tables for every ordinary pass before its passes run.
  int rates[20];
  for (int h = 0; h < 20; ++h) rates[h] = 1 + h % 5;
  compare<TestType>(attn::local_window{12} | attn::dilated{2, 90, rates} | attn::global_tokens::strided(9), 2, 211,
                    20, 64, true);
}

TEMPLATE_TEST_CASE("CUDA attention with an explicit global list in device memory", "[attention][cuda]",
                   __nv_bfloat16, float) {
  std::vector<int> const list = {2, 40, 41, 200, 511};
  dbuf<int> d_list(list.size());
  d_list.upload(list);
  auto const u = attn::local_window{12} | attn::dilated{3, 60} |
                 attn::global_tokens::explicit_list(d_list.ptr, int(list.size()));
  // The reference reads the list on the host: it gets the same policy over a host copy.
  auto const h = attn::local_window{12} | attn::dilated{3, 60} |
                 attn::global_tokens::explicit_list(list.data(), int(list.size()));
  compare_with<TestType>(u, h, 2, 600, 2, 64, true, 0, -1);
}

TEMPLATE_TEST_CASE("every hsa tier on CUDA, head_dim 64 and 128, padded batches", "[attention][hsa][cuda]",
                   __nv_bfloat16, float) {
  auto const h = test::small_tiers();
  for (int n : {40, 65, 200, 256, 500, 601, 1111}) compare<TestType>(h, 1, n, 2, 64);
  compare<TestType>(h, 3, 700, 2, 128, true);
  attn::hsa const def{};
  compare<TestType>(def, 1, 1000, 1, 64);
  compare<TestType>(def, 1, 3000, 2, 128, false, 0, 600);
  compare<TestType>(def, 1, 6000, 1, 64, false, 5000, 6000);
  compare<TestType>(def, 1, 20000, 2, 64, false, 0, 300);
  compare<TestType>(def, 1, 20000, 1, 64, false, 9000, 9300);
}

TEMPLATE_TEST_CASE("CUDA attention applies softmax_scale, negative included", "[attention][cuda]", __nv_bfloat16,
                   float) {
  // Exact chunks fold the scale into the exponent and take the row max of the raw scores (the min
  // when the scale is negative); masked chunks scale first. Both kinds occur in each case.
  for (double const scale : {0.3, -0.2}) {
    compare<TestType>(attn::dense{}, 1, 300, 2, 64, false, 0, -1, scale);
    compare<TestType>(attn::local_window{40}, 1, 500, 2, 64, false, 0, -1, scale);
    compare<TestType>(test::small_tiers(), 1, 700, 2, 128, true, 0, -1, scale);
  }
}

namespace {
/// Runs `policy` on fresh normal inputs with one NaN at element 5 of head 0 of token `row` in q
/// (which = 0), k (1) or v (2); returns o and lse as floats (o: [n][2 heads][64], lse: [2][n]).
template <class T, class Policy>
std::pair<std::vector<float>, std::vector<float>> run_with_nan(Policy const& policy, int n, int which, int row) {
  int const heads = 2, dim = 64;
  std::size_t const elems = std::size_t(n) * heads * dim;
  static std::random_device rd;
  unsigned const seed = rd();
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::vector<T> h[3];
  for (auto& t : h) {
    t.resize(elems);
    for (auto& x : t) x = from_float<T>(nd(rng));
  }
  h[which][std::size_t(row) * heads * dim + 5] = from_float<T>(std::nanf(""));
  dbuf<T> dq(elems), dk(elems), dv(elems), dout(elems);
  dbuf<float> dlse(std::size_t(heads) * n);
  dq.upload(h[0]); dk.upload(h[1]); dv.upload(h[2]);
  auto a = make_attention_args<T>(dq.ptr, dk.ptr, dv.ptr, dout.ptr, 1, n, heads, dim);
  a.maybe_lse = reinterpret_cast<typename attention_args<T>::lse_type*>(dlse.ptr);
  context<drdiff::cuda> const ctx{};
  std::size_t const ws_bytes = attention_workspace_bytes(ctx, policy, a);
  dbuf<unsigned char> ws(ws_bytes);
  attention(ctx, policy, a, ws.ptr, ws_bytes);
  DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> o;
  for (T x : dout.download()) o.push_back(to_float(x));
  return {o, dlse.download()};
}
}  // namespace

// The CPU test's twin (bad_input_test.cpp). On the GPU fmaxf drops a NaN score from the running max;
// its exp2 still makes the row's sum NaN, and the epilogue must then write NaN (not 0 and −∞, the
// answer for a row with no key) in o and lse, on the one-pass, multi-pass and split-key paths.
TEMPLATE_TEST_CASE("a NaN in q, k or v reaches the CUDA output and lse, never a plausible number",
                   "[attention][errors][cuda]", __nv_bfloat16, float) {
  struct setting { int n, row, far; };
  auto check = [](auto const& policy, setting st, bool all_rows_see_row) {
    for (int which = 0; which < 3; ++which) {
      auto const [o, lse] = run_with_nan<TestType>(policy, st.n, which, st.row);
      INFO("N " << st.n << ", NaN in " << "qkv"[which] << " at token " << st.row);
      auto at = [&, &o = o](int i, int hd, int d) { return o[(std::size_t(i) * 2 + hd) * 64 + d]; };
      auto l = [&, &lse = lse](int hd, int i) { return lse[std::size_t(hd) * st.n + i]; };
      CHECK(std::isnan(at(st.row, 0, 5)));
      if (which == 0) CHECK(std::isnan(l(0, st.row)));
      if (which == 1) CHECK(std::isnan(l(0, 0)));  // row 0 is global (or dense): it attends every key
      if (which == 2) CHECK(std::isnan(at(0, 0, 5)));
      CHECK(std::isfinite(at(st.row, 1, 5)));  // head 1 never sees the NaN
      CHECK(std::isfinite(l(1, st.row)));
      if (!all_rows_see_row) {  // a row far from it, in another tile, that does not attend token `row`
        CHECK(std::isfinite(at(st.far, 0, 5)));
        CHECK(std::isfinite(l(0, st.far)));
      }
    }
  };
  check(attn::local_window{16} | attn::global_tokens::first(4), {300, 150, 299}, false);
  check(attn::dense{}, {300, 150, 0}, true);
  check(attn::hsa{}, {6000, 150, 5999}, false);    // window, dilated and 64 global keys, several passes
  check(attn::hsa{}, {20000, 150, 19999}, false);  // the longest tier: global rows split their keys
}

TEST_CASE("fp32 on CUDA takes every supported head_dim", "[attention][cuda]") {
  for (int d : {32, 40, 96, 256}) compare<float>(attn::local_window{10} | attn::dilated{2, 20}, 1, 90, 1, d);
}

TEST_CASE("CUDA attention rejects what it cannot run", "[attention][errors][cuda]") {
  using Catch::Matchers::Contains;
  std::size_t const e = 100 * 128;  // one tensor of up to 100 rows × 128
  dbuf<__nv_bfloat16> buf(4 * e);
  auto args = [&](int off, int n, int d) {
    return make_attention_args<__nv_bfloat16>(buf.ptr + off, buf.ptr + e, buf.ptr + 2 * e, buf.ptr + 3 * e, 1, n, 1, d);
  };
  REQUIRE_THROWS_WITH(attention(context<drdiff::cuda>{}, attn::dense{}, args(0, 100, 96)), Contains("head_dim = 96"));
  REQUIRE_THROWS_WITH(attention(context<drdiff::cuda>{}, attn::dense{}, args(1, 50, 64)), Contains("16-byte aligned"));
  REQUIRE_THROWS_WITH(attention(context<drdiff::cuda>{}, attn::local_window{8} | attn::global_tokens::first(4), args(0, 100, 64)),
                      Contains("bytes of workspace"));
  REQUIRE_THROWS_WITH(attention(context<drdiff::cuda>{}, attn::dense{}, args(0, 1 << 29, 64)), Contains("seq = 536870912"));
  REQUIRE_NOTHROW(attention(context<drdiff::cuda>{}, attn::dense{}, args(0, 100, 64)));  // one pass: no workspace needed
  DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
}

TEST_CASE("hsa at N = 1,048,576 on CUDA matches the reference on sampled rows", "[attention][hsa][long][cuda]") {
  attn::hsa const h{};
  int const n = 1 << 20;
  compare<__nv_bfloat16>(h, 1, n, 1, 64, false, 0, 130);            // global rows and the first tiles
  compare<__nv_bfloat16>(h, 1, n, 1, 64, false, n / 2 - 40, n / 2 + 40);
  compare<__nv_bfloat16>(h, 1, n, 1, 64, false, n - 70, n);          // the ragged end
}
