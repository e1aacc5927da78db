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

/// The global tokens of a built-in policy at (n, heads), sorted: the same for every head (the
/// built-in policies choose them per policy, not per head; checked). `host_list` stands in for the
/// policy's list when that list lives in device memory (nullptr: read the policy's own).
/// `list_readable` = false when the policy's own list is in device memory (then a list rule needs
/// `host_list`).
template <class Policy>
std::vector<int> global_positions(Policy const& policy, int n, int heads, int const* host_list = nullptr,
                                  bool list_readable = true) {
  std::vector<int> out;
  pattern first{};
  for (int h = 0; h < heads; ++h) {
    pattern p = attn::bind(policy, n, h);
    if (p.rule == global_rule::list && host_list) p.global_list = host_list;
    if (h == 0) {
      first = p;
      index_range const g = p.global_keys();
      DRDIFF_CHECK(p.rule != global_rule::list || p.num_global == 0 || p.global_list, "global_positions: the "
                   "policy's global list is null");
      DRDIFF_CHECK(p.rule != global_rule::list || p.num_global == 0 || host_list || list_readable,
                   "global_positions: the policy's global tokens are an explicit list in device memory; the plan is "
                   "made on the host and needs the same ", p.num_global, " positions in host memory "
                   "(distributed_attention_args::maybe_host_global_list)");
      out.reserve(std::size_t(g.count));
      for (int x = 0; x < g.count; ++x) out.push_back(g[x]);
      continue;
    }
    DRDIFF_CHECK(p.rule == first.rule && p.num_global == first.num_global && p.global_stride == first.global_stride &&
                     p.global_list == first.global_list, "global_positions: head ", h, " has other global tokens "
                 "than head 0; sequence parallelism needs one set for all heads");
  }
  return out;
}

/// One rank's plan for a sequence-parallel attention call, computed the same way on every rank (each
/// rank also works out what its peers need from it). Host memory; see docs/attention.md, "Sequence
/// parallelism".
///
/// The rank's *frame* is the sequence it runs the ordinary attention on: the global tokens left of
/// its slab, the slab [lo, hi) — its chunk and the non-global keys of its halo, at their distances —
/// and the global tokens right of it. In the frame the window and the dilations mean what they
/// mean in the sequence (they depend on distances only), the global tokens are a list, and keys of
/// the slab that no row of the chunk attends are never reached by those rows; so the chunk's
/// non-global rows get exactly their keys. Global rows attend every key: each rank computes them
/// over its own chunk's keys and the parts are merged by log-sum-exp.
struct dist_plan {
  int n = 0, heads = 0, ranks = 1, rank = 0;
  chunk own{};
  int lo = 0, hi = 0;                ///< the slab
  int left_globals = 0;              ///< global tokens below lo: frame rows [0, left_globals)
  int frame_len = 0;                 ///< rows of the frame
  std::vector<int> globals;          ///< the G global positions, sorted
  std::vector<int> frame_globals;    ///< their rows in the frame (sorted, as the frame's list)
  std::vector<int> owned_first;      ///< globals[owned_first[r] .. owned_first[r + 1]) lie in rank r's chunk
  int max_owned = 0;                 ///< the most global tokens one rank owns
  std::vector<std::vector<int>> recv_keys;  ///< per peer: the halo keys it sends this rank (sorted)
  std::vector<std::vector<int>> send_keys;  ///< per peer: the keys of this rank's chunk it needs

  int num_globals() const noexcept { return int(globals.size()); }
  /// Frame row of the chunk's first row.
  int chunk_row() const noexcept { return left_globals + own.begin - lo; }
  /// Frame row of a key the frame holds: a slab position, or a global token's position.
  int frame_row(int j) const {
    if (j >= lo && j < hi) return left_globals + j - lo;
    auto const it = std::lower_bound(globals.begin(), globals.end(), j);
    DRDIFF_CHECK(it != globals.end() && *it == j, "dist_plan: key ", j, " is not in rank ", rank, "'s frame");
    return frame_globals[std::size_t(it - globals.begin())];
  }
};

/// The non-global halo keys of [begin, end) under every head of `policy` (with `host_list` for a
/// device-memory global list), and whether a head is dense.
template <class Policy>
std::vector<int> plain_halo(Policy const& policy, int n, int heads, int begin, int end, int const* host_list,
                            std::vector<int> const& globals) {
  std::vector<int> all;
  for (int h = 0; h < heads; ++h) {
    pattern p = attn::bind(policy, n, h);
    if (p.rule == global_rule::list && host_list) p.global_list = host_list;
    auto const k = halo_keys(p, begin, end);
    for (int j : k)
      if (!std::binary_search(globals.begin(), globals.end(), j)) all.push_back(j);
  }
  std::sort(all.begin(), all.end());
  all.erase(std::unique(all.begin(), all.end()), all.end());
  return all;
}

/// The plan of rank `rank` of `ranks` for `policy` over n tokens and `heads` heads. Validates the
/// policy (it must bind to attn::pattern: the built-in policies do).
template <class Policy>
dist_plan make_dist_plan(Policy const& policy, int n, int heads, int ranks, int rank, int const* host_list = nullptr,
                         bool list_readable = true) {
  static_assert(std::is_same_v<std::decay_t<decltype(attn::bind(policy, 0, 0))>, pattern>,
                "drdiff::attn::make_dist_plan: the policy must bind to attn::pattern (the built-in policies do); "
                "sequence parallelism has no rule for other policies");
  DRDIFF_CHECK(heads > 0, "make_dist_plan: heads = ", heads, " must be > 0");
  dist_plan d;
  d.n = n;
  d.heads = heads;
  d.ranks = ranks;
  d.rank = rank;
  d.own = sequence_chunk(n, ranks, rank);
  attn::validate(policy, n, heads, host_list == nullptr && list_readable);
  d.globals = global_positions(policy, n, heads, host_list, list_readable);
  for (std::size_t x = 0; x < d.globals.size(); ++x) {  // a list given on the host is checked here
    int const g = d.globals[x];
    DRDIFF_CHECK(g >= 0 && g < n, "make_dist_plan: global token list[", x, "] = ", g, " is outside [0, N = ", n, ")");
    DRDIFF_CHECK(x == 0 || g > d.globals[x - 1], "make_dist_plan: the global token list must be strictly increasing, "
                 "but list[", x - 1, "] = ", d.globals[x - 1], " and list[", x, "] = ", g);
  }
  // What each rank needs from each other rank (the same arithmetic on every rank).
  d.recv_keys.assign(std::size_t(ranks), {});
  d.send_keys.assign(std::size_t(ranks), {});
  for (int r = 0; r < ranks; ++r) {
    chunk const c = sequence_chunk(n, ranks, r);
    auto const keys = plain_halo(policy, n, heads, c.begin, c.end, host_list, d.globals);
    for (int j : keys) {
      int const owner = chunk_owner(n, ranks, j);
      if (r == rank) d.recv_keys[std::size_t(owner)].push_back(j);
      else if (owner == rank) d.send_keys[std::size_t(r)].push_back(j);
    }
  }
  // The slab: the chunk and its plain halo.
  d.lo = d.own.begin;
  d.hi = d.own.end;
  for (auto const& keys : d.recv_keys)
    if (!keys.empty()) {
      d.lo = std::min(d.lo, keys.front());
      d.hi = std::max(d.hi, keys.back() + 1);
    }
  // The frame: left globals, the slab, right globals; the globals' rows in it.
  int const G = d.num_globals();
  d.left_globals = int(std::lower_bound(d.globals.begin(), d.globals.end(), d.lo) - d.globals.begin());
  int const right_first = int(std::lower_bound(d.globals.begin(), d.globals.end(), d.hi) - d.globals.begin());
  int const slab = d.hi - d.lo;
  d.frame_len = d.left_globals + slab + (G - right_first);
  d.frame_globals.resize(std::size_t(G));
  for (int x = 0; x < G; ++x) {
    int const j = d.globals[std::size_t(x)];
    d.frame_globals[std::size_t(x)] = x < d.left_globals ? x : x < right_first ? d.left_globals + j - d.lo
                                                                                : d.left_globals + slab + (x - right_first);
  }
  d.owned_first.assign(std::size_t(ranks) + 1, 0);
  for (int r = 0; r < ranks; ++r) {
    chunk const c = sequence_chunk(n, ranks, r);
    d.owned_first[std::size_t(r)] = int(std::lower_bound(d.globals.begin(), d.globals.end(), c.begin) - d.globals.begin());
  }
  d.owned_first[std::size_t(ranks)] = G;
  for (int r = 0; r < ranks; ++r)
    d.max_owned = std::max(d.max_owned, d.owned_first[std::size_t(r) + 1] - d.owned_first[std::size_t(r)]);
  return d;
}

/// The policy a rank runs on its frame: `inner` bound at the whole sequence's length, seen from the
/// frame (window and dilations unchanged, the global tokens as the frame's list). Trivially
/// copyable; the list is borrowed (host memory for drdiff::cpu, device memory for drdiff::cuda).
template <class Policy>
struct frame_policy {
  Policy inner{};
  int n = 0;                    ///< the whole sequence's length
  int frame_len = 0;
  int num_globals = 0;
  int const* frame_list = nullptr;
  int const* host_list = nullptr;  ///< the inner policy's global list on the host, when it has one there

  DRDIFF_HOST_DEVICE constexpr pattern bind(int len, int head) const noexcept {
    pattern p = attn::bind(inner, n, head);
    p.n = len;
    if (p.is_dense) return p;
    // Distances in the frame stay below len, so clamping to len keeps the mask (and int arithmetic).
    p.window = p.window < len ? p.window : len;
    for (int c = 0; c < p.num_dilations; ++c) {
      p.dil[c].span = p.dil[c].span < len ? p.dil[c].span : len;
      p.dil[c].rate = p.dil[c].rate < len ? p.dil[c].rate : len;
    }
    p.rule = num_globals > 0 ? global_rule::list : global_rule::none;
    p.num_global = num_globals;
    p.global_stride = 1;
    p.global_list = num_globals > 0 ? frame_list : nullptr;
    return p;
  }
  void validate(int len, int heads, bool read_pointers = true) const {
    DRDIFF_CHECK(len == frame_len, "frame_policy: the call's seq = ", len, " is not the frame's ", frame_len, " rows");
    attn::validate(inner, n, heads, read_pointers && host_list == nullptr);
  }
};

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
