// Shared by the CPU and CUDA sides of drdiff.attention_op: the tier table as an attn::hsa policy and
// [B, H, N, D] strides as the library's {batch, seq, head}. Tensors are [B, H, N, D] (PyTorch's
// convention) with any strides whose last one is 1: the library takes [batch, seq, heads, head_dim]
// with explicit strides, so no copy is made. The policy is an HSA tier table, 7 integers per tier:
// max_len, dense, window, rate, span, globals_count, sqrt_cap (the leading-token global rule;
// python/drdiff/masks.py's Tier).
#pragma once

#include <torch/extension.h>

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/policies.hpp>

#include <cstdint>
#include <vector>

namespace drdiff_op {


inline constexpr int tier_fields = 7;

inline drdiff::attn::hsa policy_from(std::vector<int64_t> const& t) {
  TORCH_CHECK(!t.empty() && t.size() % tier_fields == 0, "drdiff.hsa_attention: tiers has ", t.size(),
              " integers; it needs 7 per tier (max_len, dense, window, rate, span, globals_count, sqrt_cap)");
  int const n = int(t.size() / tier_fields);
  TORCH_CHECK(n <= drdiff::attn::hsa::max_tiers, "drdiff.hsa_attention: ", n, " tiers; at most ",
              drdiff::attn::hsa::max_tiers, " are supported");
  drdiff::attn::hsa h{};
  h.num_tiers = n;
  for (int i = 0; i < n; ++i) {
    int64_t const* f = t.data() + std::size_t(i) * tier_fields;
    for (int k = 0; k < tier_fields; ++k)
      TORCH_CHECK(f[k] >= 0 && f[k] <= INT32_MAX, "drdiff.hsa_attention: tier ", i, " field ", k, " = ", f[k],
                  " is outside 0..2^31-1");
    auto& tier = h.tiers[i];
    tier.max_len = int(f[0]);
    tier.dense = f[1] != 0;
    tier.window = int(f[2]);
    tier.rate = int(f[3]);
    tier.span = int(f[4]);
    tier.globals = drdiff::attn::global_spec{};
    if (f[5] > 0 || f[6] > 0) {
      tier.globals.rule = drdiff::attn::global_rule::first;
      tier.globals.count = int(f[5]);
      tier.globals.sqrt_cap = int(f[6]);
    }
  }
  return h;
}

/// [B, H, N, D] strides as the library's {batch, seq, head}.
inline drdiff::tensor_strides strides_of(torch::Tensor const& x) { return {x.stride(0), x.stride(2), x.stride(1)}; }

}  // namespace drdiff_op
