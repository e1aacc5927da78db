#pragma once
// Policies shared by the tests: a user's block-path policy, and an HSA table with small thresholds.

#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/index_range.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/core/config.hpp>

#include <climits>
#include <type_traits>

namespace drdiff::test {

/// Block path only: each query attends the keys of its own 32-token "document".
struct documents {
  static constexpr int block_q = 32, block_k = 32;
  DRDIFF_HOST_DEVICE bool mask(int q, int k) const { return q / 32 == k / 32; }
  DRDIFF_HOST_DEVICE int num_kv_blocks(int) const { return 1; }
  DRDIFF_HOST_DEVICE int kv_block(int qb, int) const { return qb; }
  DRDIFF_HOST_DEVICE bool full_block(int qb, int kb) const { return qb == kb; }
};

/// A user's sliding window (|i − j| ≤ w) written as a segment policy: one pass, 64-row tiles, each
/// seeing one run of keys. With Capabilities it also declares what the pass offers
/// (attention/capabilities.hpp): one run of keys per tile, owned by the distance band 0 ≤ |i − j| ≤ w,
/// and equality for sharing one bound policy between heads. The CUDA backend then runs it on the band
/// kernel; without, on the general kernel. Both compute the same.
template <bool Capabilities, int Rows = 64>
struct user_window_t {
  static constexpr int block_q = 64, block_k = 64;
  int w = 8;
  int n = 0;  ///< set by bind

  // ---- the contract: mask and block path
  DRDIFF_HOST_DEVICE bool mask(int q, int k) const { return (q > k ? q - k : k - q) <= w; }
  DRDIFF_HOST_DEVICE int lo_block(int qb) const { return (qb * 64 - w > 0 ? qb * 64 - w : 0) / 64; }
  DRDIFF_HOST_DEVICE int hi_block(int qb) const { return (qb * 64 + 63 + w < n - 1 ? qb * 64 + 63 + w : n - 1) / 64; }
  DRDIFF_HOST_DEVICE int num_kv_blocks(int qb) const { return hi_block(qb) - lo_block(qb) + 1; }
  DRDIFF_HOST_DEVICE int kv_block(int qb, int i) const { return lo_block(qb) + i; }
  DRDIFF_HOST_DEVICE bool full_block(int, int) const { return false; }
  DRDIFF_HOST_DEVICE user_window_t bind(int len, int) const { return {w, len}; }

  // ---- the segment path: one pass, tiles of Rows rows, one run of keys per tile (masked)
  DRDIFF_HOST_DEVICE int num_passes() const { return 1; }
  DRDIFF_HOST_DEVICE int num_q_tiles(int) const { return (n + Rows - 1) / Rows; }
  DRDIFF_HOST_DEVICE attn::index_range q_tile(int, int t) const {
    return attn::contiguous(t * Rows, t * Rows + Rows < n ? t * Rows + Rows : n);
  }
  DRDIFF_HOST_DEVICE bool owns(int, int i, int j) const { return mask(i, j); }
  DRDIFF_EXEC_CHECK_DISABLE  // (the backend's visitor may be device-only)
  template <class F>
  DRDIFF_HOST_DEVICE void for_each_segment(int p, int t, F&& f) const {
    attn::index_range const rows = q_tile(p, t);
    if (rows.empty()) return;
    int const lo = rows.start - w > 0 ? rows.start - w : 0;
    int const hi = rows.start + rows.count + w < n ? rows.start + rows.count + w : n;
    f(attn::contiguous(lo, hi), false);
  }

  // ---- capabilities
  template <bool C = Capabilities, std::enable_if_t<C, int> = 0>
  DRDIFF_HOST_DEVICE attn::pass_traits traits(int) const {
    attn::pass_traits t;
    t.one_run = true;
    t.band_lo = 0;
    t.band_hi = w;
    return t;
  }
  template <bool C = Capabilities, std::enable_if_t<C, int> = 0>
  DRDIFF_HOST_DEVICE friend bool operator==(user_window_t const& a, user_window_t const& b) {
    return a.w == b.w && a.n == b.n;
  }
};
using user_window = user_window_t<true>;
using user_window_plain = user_window_t<false>;
/// The same window in 128-row tiles: taller than the band kernel's tile, so that kernel must not take it.
using user_window_tall = user_window_t<true, 128>;

/// Attention sinks and a sliding window (StreamingLLM's mask): row i attends |i − j| ≤ w and the
/// first `sinks` keys. Two passes over the same 64-row tiles: the window (as user_window), then the
/// sink keys outside it, declared as a key tail (attention/capabilities.hpp): the CUDA backend
/// appends them to the window's tiles instead of launching a second pass.
struct user_sink_window {
  static constexpr int block_q = 64, block_k = 64;
  int w = 8, sinks = 4;
  int n = 0;  ///< set by bind

  DRDIFF_HOST_DEVICE bool in_window(int q, int k) const { return (q > k ? q - k : k - q) <= w; }
  DRDIFF_HOST_DEVICE bool mask(int q, int k) const { return in_window(q, k) || k < sinks; }
  // Blocks: the sink blocks [0, sb] and the window's blocks [lo, hi], merged in increasing order.
  DRDIFF_HOST_DEVICE int sink_blocks() const { return sinks > 0 && n > 0 ? ((sinks < n ? sinks : n) - 1) / 64 + 1 : 0; }
  DRDIFF_HOST_DEVICE int lo_block(int qb) const { return (qb * 64 - w > 0 ? qb * 64 - w : 0) / 64; }
  DRDIFF_HOST_DEVICE int hi_block(int qb) const { return (qb * 64 + 63 + w < n - 1 ? qb * 64 + 63 + w : n - 1) / 64; }
  DRDIFF_HOST_DEVICE int first_window_block(int qb) const {  // the window's first block not a sink block
    return lo_block(qb) > sink_blocks() ? lo_block(qb) : sink_blocks();
  }
  DRDIFF_HOST_DEVICE int num_kv_blocks(int qb) const {
    int const rest = hi_block(qb) - first_window_block(qb) + 1;
    return sink_blocks() + (rest > 0 ? rest : 0);
  }
  DRDIFF_HOST_DEVICE int kv_block(int qb, int i) const {
    return i < sink_blocks() ? i : first_window_block(qb) + (i - sink_blocks());
  }
  DRDIFF_HOST_DEVICE bool full_block(int, int) const { return false; }
  DRDIFF_HOST_DEVICE user_sink_window bind(int len, int) const { return {w, sinks, len}; }

  DRDIFF_HOST_DEVICE int num_passes() const { return 2; }
  DRDIFF_HOST_DEVICE int num_q_tiles(int) const { return (n + 63) / 64; }
  DRDIFF_HOST_DEVICE attn::index_range q_tile(int, int t) const {
    return attn::contiguous(t * 64, t * 64 + 64 < n ? t * 64 + 64 : n);
  }
  DRDIFF_HOST_DEVICE bool owns(int p, int i, int j) const {
    return p == 0 ? in_window(i, j) : j < sinks && !in_window(i, j);
  }
  /// Pass 1's one segment for rows of a tile: every sink key; exact when no row's window reaches one.
  DRDIFF_EXEC_CHECK_DISABLE
  template <class F>
  DRDIFF_HOST_DEVICE void tail_segment(int, attn::index_range rows, F&& f) const {
    int const g = sinks < n ? sinks : n;
    if (g > 0) f(attn::contiguous(0, g), rows.start - w > g - 1);
  }
  DRDIFF_EXEC_CHECK_DISABLE  // (the backend's visitor may be device-only)
  template <class F>
  DRDIFF_HOST_DEVICE void for_each_segment(int p, int t, F&& f) const {
    attn::index_range const rows = q_tile(p, t);
    if (rows.empty()) return;
    if (p == 1) return tail_segment(p, rows, f);
    int const lo = rows.start - w > 0 ? rows.start - w : 0;
    int const hi = rows.start + rows.count + w < n ? rows.start + rows.count + w : n;
    f(attn::contiguous(lo, hi), false);
  }
  DRDIFF_HOST_DEVICE attn::pass_traits traits(int p) const {
    attn::pass_traits t;
    if (p == 0) {
      t.one_run = true;
      t.band_hi = w;
    } else {
      t.key_tail = true;
    }
    return t;
  }
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
