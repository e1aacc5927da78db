#pragma once
// Policies shared by the tests: a user's block-path policy, and an HSA table with small thresholds.

#include <drdiff/attention/policies.hpp>
#include <drdiff/core/config.hpp>

#include <climits>

namespace drdiff::test {

/// Block path only: each query attends the keys of its own 32-token "document".
struct documents {
  static constexpr int block_q = 32, block_k = 32;
  DRDIFF_HOST_DEVICE bool mask(int q, int k) const { return q / 32 == k / 32; }
  DRDIFF_HOST_DEVICE int num_kv_blocks(int) const { return 1; }
  DRDIFF_HOST_DEVICE int kv_block(int qb, int) const { return qb; }
  DRDIFF_HOST_DEVICE bool full_block(int qb, int kb) const { return qb == kb; }
};

/// An HSA tier table with small thresholds, so every tier runs at test sizes.
inline attn::hsa small_tiers() {
  attn::hsa_tier const t[] = {
      {64, true, 0, 1, 0, {}, nullptr},
      {256, false, 16, 2, 64, attn::global_tokens::first_sqrt(8).spec, nullptr},
      {600, false, 16, 4, 128, attn::global_tokens::first(8).spec, nullptr},
      {INT_MAX, false, 16, 8, 256, attn::global_tokens::first(16).spec, nullptr},
  };
  return attn::hsa::from_tiers(t);
}

}  // namespace drdiff::test
