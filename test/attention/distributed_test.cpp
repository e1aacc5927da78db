// Sequence-parallel attention on the CPU. The index arithmetic (attention/distributed.hpp) against
// the pattern's own mask: each rank's halo is exactly the keys outside its chunk that its non-global
// query rows attend, no more; chunks partition the sequence; runs name the right owners. Then the
// whole call (distributed_attention over ranks that are threads, cpu_communicator) against one
// drdiff::attention on the whole sequence: every pattern, hsa tiers, chunks narrower than the reach,
// batches, strides, the lse, NaN, and the errors.

#include <drdiff/attention/distributed.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/drdiff.hpp>

#include <catch2/catch.hpp>

#include "../support/ranks.hpp"

#include <climits>
#include <cmath>
#include <exception>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <thread>
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

// ---- distributed_attention over threads ------------------------------------------------------------

namespace {

template <class T>
using lse_t = typename attention_args<T>::lse_type;

template <class T>
struct full_tensors {
  int n = 0, batch = 0, heads = 0, dim = 0;
  std::vector<T> q, k, v;
  tensor_strides strides() const { return packed_strides(n, heads, dim); }
};

template <class T>
full_tensors<T> random_tensors(int n, int batch, int heads, int dim, unsigned seed) {
  full_tensors<T> t{n, batch, heads, dim, {}, {}, {}};
  std::mt19937 gen(seed);
  std::normal_distribution<double> nd(0.0, 1.0);
  std::size_t const size = std::size_t(batch) * n * heads * dim;
  for (auto* x : {&t.q, &t.k, &t.v}) {
    x->resize(size);
    for (auto& e : *x) e = T(nd(gen));
  }
  return t;
}

/// One attention call on the whole sequence: o and lse ([batch, heads, n]).
template <class T, class Policy>
void single(Policy const& policy, full_tensors<T> const& t, std::vector<T>& o, std::vector<lse_t<T>>& lse) {
  o.assign(t.q.size(), T(0));
  lse.assign(std::size_t(t.batch) * t.heads * t.n, lse_t<T>(0));
  auto a = make_attention_args(t.q.data(), t.k.data(), t.v.data(), o.data(), t.batch, t.n, t.heads, t.dim);
  a.maybe_lse = lse.data();
  attention(context<cpu>{1}, policy, a);
}

/// The same call split over `ranks` threads; each rank's args point into the whole tensors (so its
/// strides are the whole sequence's). `tweak(rank, args)` may spoil one rank's arguments.
template <class T, class Policy, class Tweak>
void split(Policy const& policy, full_tensors<T> const& t, int ranks, std::vector<T>& o, std::vector<lse_t<T>>& lse,
           std::vector<std::string>& errors, Tweak&& tweak) {
  o.assign(t.q.size(), T(-7));
  lse.assign(std::size_t(t.batch) * t.heads * t.n, lse_t<T>(-7));
  thread_comm_group group(ranks);
  errors = test::run_ranks(ranks, [&](int r) {
    cpu_communicator comm(group, r);
    distributed_context<cpu, cpu_communicator> d{{1}, &comm};
    attn::chunk const c = attn::sequence_chunk(t.n, ranks, r);
    tensor_strides const s = t.strides();
    distributed_attention_args<T> args;
    args.seq = t.n;
    auto& a = args.chunk;
    a.batch = t.batch; a.seq = c.size(); a.heads = t.heads; a.head_dim = t.dim;
    a.q = t.q.data() + c.begin * s.seq;
    a.k = t.k.data() + c.begin * s.seq;
    a.v = t.v.data() + c.begin * s.seq;
    a.o = o.data() + c.begin * s.seq;
    a.q_strides = a.k_strides = a.v_strides = a.o_strides = s;
    std::vector<lse_t<T>> part(std::size_t(t.batch) * t.heads * c.size());
    a.maybe_lse = part.data();
    std::size_t bytes = distributed_attention_workspace_bytes(d, policy, args);
    tweak(r, args, bytes);
    std::vector<unsigned char> ws(bytes);
    distributed_attention(d, policy, args, ws.data(), ws.size());
    for (int b = 0; b < t.batch; ++b)
      for (int h = 0; h < t.heads; ++h)
        for (int i = 0; i < c.size(); ++i)
          lse[(std::size_t(b) * t.heads + h) * t.n + c.begin + i] = part[(std::size_t(b) * t.heads + h) * c.size() + i];
  });
}

template <class T, class Policy>
void check_split(Policy const& policy, int n, int batch, int heads, int dim, int ranks, double tol, unsigned seed = 7) {
  INFO("N " << n << " batch " << batch << " heads " << heads << " D " << dim << " ranks " << ranks);
  auto const t = random_tensors<T>(n, batch, heads, dim, seed + unsigned(n) + unsigned(ranks));
  std::vector<T> o1, o2;
  std::vector<lse_t<T>> l1, l2;
  std::vector<std::string> errors;
  single(policy, t, o1, l1);
  split(policy, t, ranks, o2, l2, errors, [](int, auto&, std::size_t&) {});
  for (int r = 0; r < ranks; ++r) REQUIRE(errors[std::size_t(r)] == "");
  double err = 0, lerr = 0;
  for (std::size_t e = 0; e < o1.size(); ++e) err = std::max(err, std::abs(double(o1[e]) - double(o2[e])));
  for (std::size_t e = 0; e < l1.size(); ++e) lerr = std::max(lerr, std::abs(double(l1[e]) - double(l2[e])));
  CHECK(err <= tol);
  CHECK(lerr <= tol * 10);
}

}  // namespace

TEST_CASE("distributed attention equals one call on the whole sequence, every pattern",
          "[attention][distributed][cpu]") {
  int const rates[] = {1, 3, 8, 5};
  int const list[] = {0, 17, 18, 300, 401};
  for (int ranks : {1, 2, 3, 5}) {
    check_split<double>(attn::local_window{16}, 420, 1, 2, 32, ranks, 1e-12);
    check_split<double>(attn::dilated{4, 100}, 433, 1, 1, 32, ranks, 1e-12);
    check_split<double>(attn::dilated{3, 90, rates}, 400, 1, 4, 32, ranks, 1e-12);  // per-head rates
    check_split<double>(attn::local_window{12} | attn::dilated{5, 140} | attn::global_tokens::first(9), 411, 2, 2,
                        32, ranks, 1e-12);
    check_split<double>(attn::local_window{8} | attn::global_tokens::strided(13), 420, 1, 1, 40, ranks, 1e-12);
    check_split<double>(attn::local_window{4} | attn::dilated{7, 60} | attn::dilated{2, 30} |
                            attn::global_tokens::explicit_list(list, 5), 450, 1, 1, 32, ranks, 1e-12);
    check_split<double>(attn::dense{}, 130, 2, 1, 32, ranks, 1e-12);
    check_split<double>(attn::global_tokens::first(5), 90, 1, 2, 32, ranks, 1e-12);
  }
  // Chunks narrower than the window and the span: halos from ranks past the neighbours.
  check_split<double>(attn::local_window{40} | attn::dilated{6, 150} | attn::global_tokens::strided(7), 160, 1, 1,
                      32, 16, 1e-12);
  // Every tier of a small hsa table (dense, ⌈√N⌉ globals, first G), batches and float.
  auto const small = test::small_tiers();
  for (int n : {50, 200, 500, 1200}) {
    check_split<double>(small, n, 2, 2, 32, 3, 1e-12);
    check_split<float>(small, n, 1, 2, 64, 4, 2e-5);
  }
}

TEST_CASE("distributed attention: a NaN reaches the same outputs as on one call",
          "[attention][distributed][cpu]") {
  auto policy = attn::local_window{8} | attn::dilated{4, 40} | attn::global_tokens::first(3);
  int const n = 200, ranks = 3;
  for (int which = 0; which < 3; ++which) {
    auto t = random_tensors<double>(n, 1, 1, 32, 11);
    // A NaN in a plain query row, a key in a halo, and a global token's key.
    if (which == 0) t.q[std::size_t(100) * 32 + 5] = std::numeric_limits<double>::quiet_NaN();
    if (which == 1) t.k[std::size_t(67) * 32] = std::numeric_limits<double>::quiet_NaN();
    if (which == 2) t.k[std::size_t(1) * 32] = std::numeric_limits<double>::quiet_NaN();
    std::vector<double> o1, o2, l1, l2;
    std::vector<std::string> errors;
    single(policy, t, o1, l1);
    split(policy, t, ranks, o2, l2, errors, [](int, auto&, std::size_t&) {});
    INFO("case " << which);
    std::size_t nan = 0;
    for (std::size_t e = 0; e < o1.size(); ++e) {
      REQUIRE(std::isnan(o1[e]) == std::isnan(o2[e]));
      nan += std::isnan(o1[e]) ? 1 : 0;
      if (!std::isnan(o1[e])) REQUIRE(std::abs(o1[e] - o2[e]) <= 1e-12);
    }
    CHECK(nan > 0);
    for (std::size_t e = 0; e < l1.size(); ++e) REQUIRE(std::isnan(l1[e]) == std::isnan(l2[e]));
  }
}

TEST_CASE("distributed attention refuses bad arguments on every rank", "[attention][distributed][errors][cpu]") {
  auto const policy = attn::local_window{8} | attn::global_tokens::first(4);
  auto const t = random_tensors<float>(100, 1, 1, 32, 3);
  std::vector<float> o;
  std::vector<float> lse;
  std::vector<std::string> errors;
  auto others_refused = [&](int bad) {
    for (int r = 0; r < int(errors.size()); ++r)
      if (r != bad) CHECK_THAT(errors[std::size_t(r)], Catch::Matchers::Contains("another rank's arguments were refused"));
  };
  // One rank holds the wrong number of rows.
  split(policy, t, 3, o, lse, errors, [](int r, auto& args, std::size_t&) {
    if (r == 1) args.chunk.seq -= 1;
  });
  CHECK_THAT(errors[1], Catch::Matchers::Contains("rank 1 holds chunk.seq = 32") &&
                            Catch::Matchers::Contains("[34, 67)"));
  others_refused(1);
  // A padded batch.
  int const lens[] = {50};
  split(policy, t, 2, o, lse, errors, [&](int r, auto& args, std::size_t&) {
    if (r == 0) args.chunk.maybe_kv_lens = lens;
  });
  CHECK_THAT(errors[0], Catch::Matchers::Contains("maybe_kv_lens must be null"));
  others_refused(0);
  // A workspace smaller than asked for.
  split(policy, t, 2, o, lse, errors, [](int r, auto&, std::size_t& bytes) {
    if (r == 1) bytes -= 300;
  });
  CHECK_THAT(errors[1], Catch::Matchers::Contains("workspace_bytes = "));
  others_refused(1);
  // The ranks disagree on the sequence length: each rank's own arguments are refused or they
  // disagree; no rank waits forever.
  split(policy, t, 2, o, lse, errors, [](int r, auto& args, std::size_t&) {
    if (r == 1) args.chunk.heads = 2;
  });
  CHECK(errors[0] != "");
  CHECK(errors[1] != "");
  // The ranks disagree on the scale: valid on each rank, refused on both by the agreement.
  split(policy, t, 2, o, lse, errors, [](int r, auto& args, std::size_t&) {
    if (r == 1) args.chunk.softmax_scale = 0.5;
  });
  for (auto const& e : errors) CHECK_THAT(e, Catch::Matchers::Contains("the ranks disagree on softmax_scale"));
  {  // The ranks pass different windows: the pattern's fingerprint differs, both stop.
    thread_comm_group group(2);
    std::vector<float> out(t.q.size());
    auto const err = test::run_ranks(2, [&](int r) {
      cpu_communicator comm(group, r);
      distributed_context<cpu, cpu_communicator> d{{1}, &comm};
      attn::chunk const c = attn::sequence_chunk(t.n, 2, r);
      distributed_attention_args<float> a;
      a.seq = t.n;
      a.chunk = make_attention_args<float>(t.q.data() + c.begin * 32, t.k.data() + c.begin * 32,
                                           t.v.data() + c.begin * 32, out.data() + c.begin * 32, 1, c.size(), 1, 32);
      auto const pol = attn::local_window{8 + r};
      std::vector<unsigned char> ws(distributed_attention_workspace_bytes(d, pol, a));
      distributed_attention(d, pol, a, ws.data(), ws.size());
    });
    for (auto const& e : err) CHECK_THAT(e, Catch::Matchers::Contains("disagree on the attention pattern"));
  }
  // A workspace too small on one rank: it aborts the group, so the other stops too.
  split(policy, t, 2, o, lse, errors, [](int r, auto&, std::size_t& bytes) {
    if (r == 0) bytes = 8;
  });
  CHECK_THAT(errors[0], Catch::Matchers::Contains("cannot even hold the ranks' agreement"));
  CHECK_THAT(errors[1], Catch::Matchers::Contains("thread_communicator"));
  // A null communicator, and a workspace too small for the agreement.
  distributed_attention_args<float> args;
  distributed_context<cpu, cpu_communicator> none{{1}, nullptr};
  CHECK_THROWS_WITH(distributed_attention(none, policy, args, nullptr, 0), Catch::Matchers::Contains("comm is a null"));
  thread_comm_group one(1);
  cpu_communicator comm(one, 0);
  distributed_context<cpu, cpu_communicator> d{{1}, &comm};
  CHECK_THROWS_WITH(distributed_attention(d, policy, args, nullptr, 0),
                    Catch::Matchers::Contains("cannot even hold the ranks' agreement"));
  CHECK_THROWS_WITH(thread_comm_group(0), Catch::Matchers::Contains("size = 0"));
  // A global list given on the host is checked, its first entry too.
  int const outside[] = {150};
  int const unsorted[] = {3, 9, 9};
  distributed_attention_args<float> h;
  h.seq = 100;
  h.chunk = make_attention_args<float>(t.q.data(), t.k.data(), t.v.data(), o.data(), 1, 100, 1, 32);
  h.maybe_host_global_list = outside;
  CHECK_THROWS_WITH(distributed_attention_workspace_bytes(d, attn::global_tokens::explicit_list(outside, 1), h),
                    Catch::Matchers::Contains("list[0] = 150 is outside [0, N = 100)"));
  h.maybe_host_global_list = unsorted;
  CHECK_THROWS_WITH(distributed_attention_workspace_bytes(d, attn::global_tokens::explicit_list(unsorted, 3), h),
                    Catch::Matchers::Contains("list[1] = 9 and list[2] = 9"));
  CHECK_THROWS_WITH(cpu_communicator(one, 1), Catch::Matchers::Contains("rank = 1"));
}
