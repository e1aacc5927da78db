#pragma once
/// \file
/// attn::hsa — Hierarchical Sparse Attention: the pattern is picked at run time from the
/// sequence length N by a tier table, with no recompilation.

#include <drdiff/attention/policy/union.hpp>

#include <climits>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// One row of the HSA tier table: used for N ≤ max_len (and N above the previous tier's max_len).
/// A dense tier ignores the other fields. Otherwise: local window w, one dilated component (rate,
/// span), and global tokens by `globals` (rule, count, or ⌈√N⌉ capped at `sqrt_cap`).
struct hsa_tier {
  int max_len = INT_MAX;
  bool dense = false;
  int window = 256;
  int rate = 2;
  int span = 1024;
  global_spec globals{};
  int const* maybe_head_rates = nullptr;  ///< per-head dilation rate for this tier (size: heads)
};

/// Hierarchical sparse attention. `hsa{}` holds the library's default tier table:
///
/// | N          | pattern                                            |
/// |------------|----------------------------------------------------|
/// | ≤ 1024     | dense                                              |
/// | ≤ 4096     | w = 256, δ = 2, s = 1024, first ⌈√N⌉ (≤ 64) global  |
/// | ≤ 16384    | w = 256, δ = 4, s = 2048, first 64 global          |
/// | above      | w = 256, δ = 8, s = 4096, first 128 global         |
///
/// (The paper does not publish its values; these are ours.)
struct hsa {
  static constexpr int max_tiers = 8;
  int num_tiers = 4;
  hsa_tier tiers[max_tiers] = {
      hsa_tier{1024, true, 0, 1, 0, global_spec{}, nullptr},
      hsa_tier{4096, false, 256, 2, 1024, global_spec{global_rule::first, 0, 64, nullptr}, nullptr},
      hsa_tier{16384, false, 256, 4, 2048, global_spec{global_rule::first, 64, 0, nullptr}, nullptr},
      hsa_tier{INT_MAX, false, 256, 8, 4096, global_spec{global_rule::first, 128, 0, nullptr}, nullptr},
  };

  /// A table of the given tiers (in increasing max_len; the last one should reach INT_MAX).
  template <int K>
  static hsa from_tiers(hsa_tier const (&t)[K]) {
    static_assert(K >= 1 && K <= max_tiers, "drdiff::attn::hsa::from_tiers: 1 to 8 tiers are supported.");
    hsa h{};
    h.num_tiers = K;
    for (int i = 0; i < K; ++i) h.tiers[i] = t[i];
    return h;
  }

  /// Index of the tier used at sequence length n.
  DRDIFF_HOST_DEVICE constexpr int tier_index(int n) const noexcept {
    for (int i = 0; i < num_tiers; ++i)
      if (n <= tiers[i].max_len) return i;
    return num_tiers - 1;
  }
  /// The union pattern of tier `i`.
  DRDIFF_HOST_DEVICE constexpr sparse_union tier_union(int i) const noexcept {
    hsa_tier const& t = tiers[i];
    sparse_union u{};
    u.dense = t.dense;
    if (t.dense) return u;
    u.has_window = true;
    u.window = t.window;
    u.num_dilations = 1;
    u.dil[0] = dilation{t.rate, t.span};
    u.head_rates[0] = t.maybe_head_rates;
    u.globals = t.globals;
    return u;
  }
  DRDIFF_HOST_DEVICE constexpr pattern bind(int n, int head) const noexcept {
    return tier_union(tier_index(n)).bind(n, head);
  }
  void validate(int n, int heads, bool read_pointers = true) const {
    DRDIFF_CHECK(num_tiers >= 1 && num_tiers <= max_tiers, "hsa: num_tiers = ", num_tiers, " must be in 1..",
                 max_tiers);
    for (int i = 1; i < num_tiers; ++i)
      DRDIFF_CHECK(tiers[i].max_len > tiers[i - 1].max_len, "hsa: tier max_len must increase, but tier ", i - 1,
                   " has ", tiers[i - 1].max_len, " and tier ", i, " has ", tiers[i].max_len);
    DRDIFF_CHECK(n <= tiers[num_tiers - 1].max_len, "hsa: sequence length N = ", n,
                 " is above the last tier's max_len = ", tiers[num_tiers - 1].max_len);
    int const k = tier_index(n);
    DRDIFF_CHECK(tiers[k].dense || tiers[k].window >= 0, "hsa: tier ", k, " local window w = ", tiers[k].window,
                 " must be >= 0");
    tier_union(k).validate(n, heads, read_pointers);
  }
};

}  // namespace attn
DRDIFF_NAMESPACE_END
