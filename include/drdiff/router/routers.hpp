#pragma once
/// \file
/// Router functors of dynamic expert scheduling: each maps one token's gate logits s(h) ∈ R^E to a
/// selection of experts and their combine weights. Small, trivially copyable, `DRDIFF_HOST_DEVICE`:
/// the same objects run in CPU loops and in CUDA kernels. A router writes at most `max_selected()`
/// (expert, weight) pairs, in decreasing weight order, and returns how many it wrote.
///
/// - top_k: the paper's router (softmax renormalised over the chosen k), or softmax-then-top-k.
/// - top_p: the smallest set whose probability reaches p (with k_min and k_max).
/// - adaptive: k between k_min and k_max from a complexity score in [0, 1] (a functor).
/// - biased: selection on logits + a per-expert bias (load balancing without an auxiliary loss),
///   weights from the unbiased scores (DeepSeek-V3).

#include <drdiff/core/config.hpp>
#include <drdiff/core/error.hpp>

#include <cmath>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace router {

/// Most experts a router supports (selection buffers live in registers / on the stack).
inline constexpr int max_experts = 256;

/// What a router may know about a token besides its logits.
struct token_info {
  int token = 0;          ///< index in the batch
  float timestep = 0.f;   ///< the diffusion time t ∈ [0, 1] of the call (1 = pure noise)
  float score = 0.f;      ///< an external complexity score (e.g. a learned scalar head), in [0, 1]
};

namespace detail {
/// Indices of the `k` largest values of v[0..e) into idx (descending; ties keep the lower index).
DRDIFF_HOST_DEVICE void top_indices(float const* v, int e, int k, int* idx) {
  for (int j = 0; j < k; ++j) idx[j] = -1;
  for (int i = 0; i < e; ++i) {
    int pos = k;
    while (pos > 0 && (idx[pos - 1] < 0 || v[i] > v[idx[pos - 1]])) --pos;
    if (pos >= k) continue;
    for (int j = k - 1; j > pos; --j) idx[j] = idx[j - 1];
    idx[pos] = i;
  }
}
/// Softmax of logits into p (max-subtracted, in float); returns log Σ exp (the z-loss input).
DRDIFF_HOST_DEVICE float softmax(float const* logits, int e, float* p) {
  float mx = logits[0];
  for (int i = 1; i < e; ++i) mx = logits[i] > mx ? logits[i] : mx;
  float sum = 0.f;
  for (int i = 0; i < e; ++i) sum += (p[i] = expf(logits[i] - mx));
  for (int i = 0; i < e; ++i) p[i] /= sum;
  return mx + logf(sum);
}
}  // namespace detail

/// Top-k routing. renormalize = true: weights are the softmax over the chosen k logits (the
/// paper's s(h) = W·SG(h) + b, softmax renormalised over the top-k); false: the global softmax
/// probabilities of the chosen experts (softmax-then-top-k, Switch/GShard style).
struct top_k {
  int k = 2;
  bool renormalize = true;

  void validate(int e) const {
    DRDIFF_CHECK(k >= 1 && k <= e, "top_k: k = ", k, " must be in 1..E = ", e);
  }

  DRDIFF_HOST_DEVICE int max_selected(int) const { return k; }
  DRDIFF_HOST_DEVICE int operator()(float const* logits, int e, token_info const&, int* experts, float* weights) const {
    float p[max_experts];
    detail::softmax(logits, e, p);
    detail::top_indices(p, e, k, experts);
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += (weights[j] = p[experts[j]]);
    if (renormalize)
      for (int j = 0; j < k; ++j) weights[j] /= sum;
    return k;
  }
};

/// Top-p (dynamic) routing: experts in decreasing probability until their cumulative probability
/// reaches p (the crossing expert included), at least k_min and at most k_max. Weights are the raw
/// probabilities (as in the reference release) or renormalised over the selection.
struct top_p {
  float p = 0.4f;
  int k_min = 1, k_max = 4;
  bool renormalize = false;

  void validate(int e) const {
    DRDIFF_CHECK(p > 0.f && p <= 1.f, "top_p: p = ", p, " must be in (0, 1]");
    DRDIFF_CHECK(k_min >= 1 && k_min <= k_max, "top_p: k_min = ", k_min, " must be in 1..k_max = ", k_max);
    DRDIFF_CHECK(k_min <= e, "top_p: k_min = ", k_min, " exceeds E = ", e);
  }

  DRDIFF_HOST_DEVICE int max_selected(int e) const { return k_max < e ? k_max : e; }
  DRDIFF_HOST_DEVICE int operator()(float const* logits, int e, token_info const&, int* experts, float* weights) const {
    float prob[max_experts];
    detail::softmax(logits, e, prob);
    int const cap = max_selected(e);
    detail::top_indices(prob, e, cap, experts);
    int n = 0;
    float cum = 0.f;
    while (n < cap && (n < k_min || cum < p)) cum += (weights[n] = prob[experts[n]]), ++n;
    if (renormalize)
      for (int j = 0; j < n; ++j) weights[j] /= cum;
    return n;
  }
};

/// Normalised entropy of the router distribution, H(p)/log E ∈ [0, 1]: flat routing = hard token.
struct entropy_score {
  DRDIFF_HOST_DEVICE float operator()(float const* prob, int e, token_info const&) const {
    float h = 0.f;
    for (int i = 0; i < e; ++i) h -= prob[i] > 0.f ? prob[i] * logf(prob[i]) : 0.f;
    return e > 1 ? h / logf(float(e)) : 0.f;
  }
};
/// The diffusion time step (noisier inputs get more experts, or fewer with invert).
struct timestep_score {
  bool invert = false;
  DRDIFF_HOST_DEVICE float operator()(float const*, int, token_info const& info) const {
    return invert ? 1.f - info.timestep : info.timestep;
  }
};
/// An external per-token score, e.g. a learned scalar head (token_info::score).
struct external_score {
  DRDIFF_HOST_DEVICE float operator()(float const*, int, token_info const& info) const { return info.score; }
};
/// A weighted combination of two scores: wa·a + wb·b.
template <class A, class B>
struct mixed_score {
  A a;
  B b;
  float wa = 0.5f, wb = 0.5f;
  DRDIFF_HOST_DEVICE float operator()(float const* prob, int e, token_info const& info) const {
    return wa * a(prob, e, info) + wb * b(prob, e, info);
  }
};

/// Complexity-adaptive top-k: k = k_min + round(clamp(score, 0, 1)·(k_max − k_min)); weights are the
/// softmax renormalised over the chosen k.
template <class Score = entropy_score>
struct adaptive {
  int k_min = 1, k_max = 4;
  Score score{};

  void validate(int e) const {
    DRDIFF_CHECK(k_min >= 1 && k_min <= k_max, "adaptive: k_min = ", k_min, " must be in 1..k_max = ", k_max);
    DRDIFF_CHECK(k_min <= e, "adaptive: k_min = ", k_min, " exceeds E = ", e);
  }

  DRDIFF_HOST_DEVICE int max_selected(int e) const { return k_max < e ? k_max : e; }
  DRDIFF_HOST_DEVICE int operator()(float const* logits, int e, token_info const& info, int* experts,
                                    float* weights) const {
    float prob[max_experts];
    detail::softmax(logits, e, prob);
    float c = score(prob, e, info);
    c = c < 0.f ? 0.f : (c > 1.f ? 1.f : c);
    int const hi = max_selected(e);
    int k = k_min + int(floorf(c * float(hi - k_min) + 0.5f));
    k = k < k_min ? k_min : (k > hi ? hi : k);
    detail::top_indices(prob, e, k, experts);
    float sum = 0.f;
    for (int j = 0; j < k; ++j) sum += (weights[j] = prob[experts[j]]);
    for (int j = 0; j < k; ++j) weights[j] /= sum;
    return k;
  }
};

/// Selection on logits + bias[e] (bias borrowed: host memory on CPU, device memory on CUDA), weights
/// from the inner router's unbiased scores renormalised over the same experts.
template <class Router>
struct biased {
  Router inner;
  float const* bias = nullptr;

  void validate(int e) const {
    DRDIFF_CHECK(bias != nullptr, "biased: the bias pointer is null");
    inner.validate(e);
  }

  DRDIFF_HOST_DEVICE int max_selected(int e) const { return inner.max_selected(e); }
  DRDIFF_HOST_DEVICE int operator()(float const* logits, int e, token_info const& info, int* experts,
                                    float* weights) const {
    float shifted[max_experts], prob[max_experts];
    for (int i = 0; i < e; ++i) shifted[i] = logits[i] + bias[i];
    int const n = inner(shifted, e, info, experts, weights);
    detail::softmax(logits, e, prob);
    float sum = 0.f;
    for (int j = 0; j < n; ++j) sum += (weights[j] = prob[experts[j]]);
    for (int j = 0; j < n; ++j) weights[j] /= sum;
    return n;
  }
};

/// Expert choice (Zhou et al., arXiv 2202.09368): each expert takes the c = ⌈capacity·T/E⌉ tokens
/// of highest router probability (ties: lower token index); a token gets 0..E experts, weighted by
/// their probabilities, combined in increasing expert index. Batch-dependent by construction: a
/// token's output depends on the other tokens of the call, so a diffusion sample's x̂0 is no longer a
/// per-sample function (prefer token choice at inference). Not a per-token functor: moe_forward has
/// its own path for it on both backends.
struct expert_choice {
  float capacity = 2.f;
  void validate(int) const {
    DRDIFF_CHECK(std::isfinite(capacity) && capacity > 0.f, "expert_choice: capacity = ", capacity, " must be > 0");
  }
  /// Tokens per expert for a call of T tokens.
  int per_expert(int tokens, int experts) const {
    int const c = int(std::ceil(double(capacity) * tokens / experts));
    return c < tokens ? c : tokens;
  }
  DRDIFF_HOST_DEVICE int max_selected(int e) const { return e; }
};

/// Per-call statistics of an MoE layer, for monitoring (both backends).
struct moe_stats {
  std::vector<int> tokens_per_expert;  ///< selections per expert (kept ones, with a capacity limit)
  double mean_active = 0;              ///< mean experts per token
  double balance_loss = 0;             ///< Switch: E · Σ_i f_i P_i (f: share of tokens whose argmax is i; P: mean prob)
  double z_loss = 0;                   ///< mean over tokens of (log Σ_e exp s_e)²
  int dropped = 0;                     ///< selections dropped by the capacity limit
};

}  // namespace router
DRDIFF_NAMESPACE_END
