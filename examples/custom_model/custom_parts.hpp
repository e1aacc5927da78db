#pragma once
// A user's own parts for a DrDiff model (docs/model.md walks through them): an attention policy and
// a router functor. Both are small trivially copyable structs with DRDIFF_HOST_DEVICE members, so the
// same objects run in the CPU loops and inside the CUDA kernels.

#include <drdiff/core/config.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/router/routers.hpp>

#include <cmath>

namespace custom {

/// Attention within 256-token paragraphs, plus everyone attends to the first 64 tokens (the
/// prompt). A block-path policy with 64 × 64 blocks; it depends on N, so bind(n, head) returns the
/// bound form that knows how many key blocks exist.
struct paragraphs {
  static constexpr int block_q = 64, block_k = 64, per_paragraph = 4;  // 4 blocks = 256 tokens

  struct bound {
    static constexpr int block_q = 64, block_k = 64;
    int blocks = 0;  // ⌈n / 64⌉
    DRDIFF_HOST_DEVICE bool mask(int q, int k) const { return k < 64 || q / 256 == k / 256; }
    DRDIFF_HOST_DEVICE int first(int qb) const { return qb / per_paragraph * per_paragraph; }
    DRDIFF_HOST_DEVICE int num_kv_blocks(int qb) const {
      int const f = first(qb), own = (blocks - f < per_paragraph ? blocks - f : per_paragraph);
      return own + (f > 0 ? 1 : 0);  // the paragraph's blocks, and block 0 when it is not among them
    }
    DRDIFF_HOST_DEVICE int kv_block(int qb, int i) const {  // increasing key blocks
      int const f = first(qb);
      if (f > 0) return i == 0 ? 0 : f + i - 1;
      return i;
    }
    DRDIFF_HOST_DEVICE bool full_block(int, int) const { return true; }  // blocks never straddle the rule
  };
  bound bind(int n, int /*head*/) const { return bound{(n + 63) / 64}; }
  void validate(int n, int heads) const {
    DRDIFF_CHECK(n > 0 && heads > 0, "paragraphs: n = ", n, " and heads = ", heads, " must be > 0");
  }
  // The unbound form must satisfy the contract too (it is never run unbound).
  DRDIFF_HOST_DEVICE bool mask(int q, int k) const { return k < 64 || q / 256 == k / 256; }
  DRDIFF_HOST_DEVICE int num_kv_blocks(int) const { return 0; }
  DRDIFF_HOST_DEVICE int kv_block(int, int) const { return 0; }
  DRDIFF_HOST_DEVICE bool full_block(int, int) const { return true; }
};

/// Every expert whose router probability reaches `tau` (at least the best one, at most k_max),
/// weights renormalised over the selection: a confident token uses one expert, a hesitant one more.
struct threshold_router {
  float tau = 0.2f;
  int k_max = 3;

  void validate(int e) const {
    DRDIFF_CHECK(tau > 0.f && tau <= 1.f, "threshold_router: tau = ", tau, " must be in (0, 1]");
    DRDIFF_CHECK(k_max >= 1 && k_max <= e, "threshold_router: k_max = ", k_max, " must be in 1..E = ", e);
  }
  DRDIFF_HOST_DEVICE int max_selected(int e) const { return k_max < e ? k_max : e; }
  DRDIFF_HOST_DEVICE int operator()(float const* logits, int e, drdiff::router::token_info const&, int* experts,
                                    float* weights) const {
    float mx = logits[0];
    for (int i = 1; i < e; ++i) mx = logits[i] > mx ? logits[i] : mx;
    float z = 0.f;
    for (int i = 0; i < e; ++i) z += expf(logits[i] - mx);
    int n = 0;
    float sum = 0.f;
    bool taken[drdiff::router::max_experts] = {};
    while (n < max_selected(e)) {  // greedy by probability, ties to the smaller index
      int best = -1;
      for (int i = 0; i < e; ++i)
        if (!taken[i] && (best < 0 || logits[i] > logits[best])) best = i;
      float const p = expf(logits[best] - mx) / z;
      if (n > 0 && p < tau) break;
      taken[best] = true;
      experts[n] = best;
      weights[n] = p;
      sum += p;
      ++n;
    }
    for (int j = 0; j < n; ++j) weights[j] /= sum;
    return n;
  }
};

}  // namespace custom
