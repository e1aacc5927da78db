#pragma once
/// \file
/// The index arithmetic of sequence-parallel attention (portable; no communication here). The
/// sequence is split into contiguous chunks, one per rank. A rank's non-global query rows attend
/// only keys near its chunk (the window and the dilation spans of its edges) and the global keys, so
/// it needs a halo of keys from its neighbours and the global tokens' keys, not the whole K and V as
/// ring attention moves them. Global query rows attend every key: each rank computes them over the
/// keys it holds and the partial results are merged by log-sum-exp, so they need no halo.
///
///   auto c = attn::sequence_chunk(n, ranks, rank);              // [begin, end)
///   auto keys = attn::halo_keys(policy, n, heads, c.begin, c.end); // sorted, outside the chunk
///   auto runs = attn::halo_runs(keys, n, ranks);                 // what to receive from whom

#include <drdiff/attention/concepts.hpp>
#include <drdiff/attention/pattern.hpp>
#include <drdiff/core/error.hpp>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// Query rows [begin, end) of one rank.
struct chunk {
  int begin = 0, end = 0;
  int size() const noexcept { return end - begin; }
};

/// Rank `rank`'s chunk of a sequence of n tokens split into `ranks` contiguous chunks whose sizes
/// differ by at most one (the first n % ranks chunks are one longer).
inline chunk sequence_chunk(int n, int ranks, int rank) {
  DRDIFF_CHECK(n > 0, "sequence_chunk: n = ", n, " must be > 0");
  DRDIFF_CHECK(ranks >= 1 && ranks <= n, "sequence_chunk: ranks = ", ranks, " must be in 1..n = ", n);
  DRDIFF_CHECK(rank >= 0 && rank < ranks, "sequence_chunk: rank = ", rank, " must be in 0..", ranks - 1);
  int const base = n / ranks, extra = n % ranks;
  int const begin = rank * base + std::min(rank, extra);
  return {begin, begin + base + (rank < extra ? 1 : 0)};
}

/// The rank whose chunk holds token j.
inline int chunk_owner(int n, int ranks, int j) {
  int const base = n / ranks, extra = n % ranks, cut = extra * (base + 1);
  return j < cut ? j / (base + 1) : extra + (j - cut) / base;
}

/// The keys outside [begin, end) that the non-global query rows of the chunk attend under the bound
/// pattern `p` (one head), sorted and distinct: exactly those, no more.
inline std::vector<int> halo_keys(pattern const& p, int begin, int end) {
  DRDIFF_CHECK(begin >= 0 && begin < end && end <= p.n, "halo_keys: the chunk [", begin, ", ", end,
               ") is not a non-empty part of [0, n = ", p.n, ")");
  std::vector<int> keys;
  // The chunk's non-global rows: the nearest one to a key, walking inward from an edge.
  auto first_plain = [&](int from, int step, int stop) {  // first non-global row from `from` towards `stop`
    for (int i = from; step > 0 ? i < stop : i > stop; i += step)
      if (!p.is_global(i)) return i;
    return -1;
  };
  bool const any_plain = first_plain(begin, 1, end) >= 0;
  if (!any_plain) return keys;  // only global rows: they are merged by lse, with no halo
  if (p.is_dense) {
    for (int j = 0; j < p.n; ++j)
      if (j < begin || j >= end) keys.push_back(j);
    return keys;
  }
  // Is key j (outside the chunk) attended by a non-global row through the window or a dilation?
  auto reached = [&](int j) {
    bool const left = j < begin;
    int const edge = left ? begin : end - 1, inward = left ? 1 : -1, stop = left ? end : begin - 1;
    int const gap = left ? begin - j : j - (end - 1);  // distance to the nearest chunk row
    if (p.window >= gap) {
      int const i = first_plain(edge, inward, stop);
      if (i >= 0 && (i > j ? i - j : j - i) <= p.window) return true;
    }
    for (int c = 0; c < p.num_dilations; ++c) {
      int const rate = p.dil[c].rate, span = p.dil[c].span;
      if (span < gap) continue;
      // The chunk rows congruent to j mod rate, from the one nearest to j inward, within the span.
      int const off = ((left ? edge - j : j - edge) % rate + rate) % rate;
      int const start = left ? edge + (rate - off) % rate : edge - (rate - off) % rate;
      for (int i = start; left ? i < end : i >= begin; i += inward * rate) {
        int const d = i > j ? i - j : j - i;
        if (d > span) break;
        if (!p.is_global(i)) return true;
      }
    }
    return false;
  };
  int const reach = p.reach();  // −1: neither a window nor a dilation
  if (reach >= 0) {
    for (int j = std::max(0, begin - reach); j < begin; ++j)
      if (reached(j)) keys.push_back(j);
    for (int j = end; j < std::min(p.n, end + reach); ++j)
      if (reached(j)) keys.push_back(j);
  }
  // Every non-global row attends every global key.
  index_range const g = p.global_keys();
  for (int x = 0; x < g.count; ++x) {
    int const j = g[x];
    if (j < begin || j >= end) keys.push_back(j);
  }
  std::sort(keys.begin(), keys.end());
  keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
  return keys;
}

/// The same for every head of a built-in policy (the union over heads: K and V move once for all of
/// them). Validates the policy for (n, heads).
template <class Policy>
std::vector<int> halo_keys(Policy const& policy, int n, int heads, int begin, int end) {
  attn::validate(policy, n, heads);
  std::vector<int> all;
  for (int h = 0; h < heads; ++h) {
    auto const b = attn::bind(policy, n, h);
    static_assert(std::is_same_v<std::decay_t<decltype(b)>, pattern>,
                  "drdiff::attn::halo_keys: the policy must bind to attn::pattern (the built-in policies do); a "
                  "block-path policy has no halo rule");
    auto const k = halo_keys(b, begin, end);
    all.insert(all.end(), k.begin(), k.end());
  }
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());
  return all;
}

/// Runs of consecutive halo keys, each within one owner's chunk: what to receive from whom.
struct halo_run {
  int rank = 0, start = 0, count = 0;
};

inline std::vector<halo_run> halo_runs(std::vector<int> const& keys, int n, int ranks) {
  DRDIFF_CHECK(ranks >= 1 && ranks <= n, "halo_runs: ranks = ", ranks, " must be in 1..n = ", n);
  std::vector<halo_run> runs;
  for (int j : keys) {
    DRDIFF_CHECK(j >= 0 && j < n, "halo_runs: key ", j, " is outside [0, n = ", n, ")");
    int const r = chunk_owner(n, ranks, j);
    if (!runs.empty() && runs.back().rank == r && runs.back().start + runs.back().count == j) ++runs.back().count;
    else runs.push_back({r, j, 1});
  }
  return runs;
}

/// Bytes a rank receives per attention layer: its halo's K and V rows (all heads of head_dim values
/// of `elem_bytes` each), against ring attention's, which moves every other rank's K and V.
struct halo_traffic {
  std::int64_t halo_bytes = 0, ring_bytes = 0;
};
inline halo_traffic traffic(std::size_t halo_count, int chunk_size, int n, int heads, int head_dim, int elem_bytes) {
  std::int64_t const row = std::int64_t(2) * heads * head_dim * elem_bytes;  // a key's K and V
  return {std::int64_t(halo_count) * row, std::int64_t(n - chunk_size) * row};
}

}  // namespace attn
DRDIFF_NAMESPACE_END
