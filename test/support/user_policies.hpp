#pragma once
// Policies a user might write, used by the tests to exercise the block path.

#include <drdiff/core/config.hpp>

namespace drdiff::test {

/// Block path only: each query attends the keys of its own 32-token "document".
struct documents {
  static constexpr int block_q = 32, block_k = 32;
  DRDIFF_HOST_DEVICE bool mask(int q, int k) const { return q / 32 == k / 32; }
  DRDIFF_HOST_DEVICE int num_kv_blocks(int) const { return 1; }
  DRDIFF_HOST_DEVICE int kv_block(int qb, int) const { return qb; }
  DRDIFF_HOST_DEVICE bool full_block(int qb, int kb) const { return qb == kb; }
};

}  // namespace drdiff::test
