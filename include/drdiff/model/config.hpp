#pragma once
/// \file
/// The DrDiff model's configuration: sizes, the type choices (attention policy, router) and the
/// sampling settings (solver, steps, rounding, anchor guidance), and the presets tiny / small / base.
/// Portable: no Eigen, no CUDA.
///
/// The network (DiffuSeq's denoiser with HSA and routed MoE blocks): token embedding [V, d_e] →
/// up-projection to d_model → + time embedding (sinusoidal(1000·t) → Linear → SiLU → Linear) →
/// L × [LayerNorm → multi-head attention with the policy (RoPE on q and k: no maximum length) →
/// residual → LayerNorm → routed MoE FFN (+ optional shared experts) → residual] → LayerNorm →
/// down-projection to d_e = the data prediction x̂0 (or, with prediction::categorical, the logits
/// z·Eᵀ over the tied table and x̂0 = softmax(z·Eᵀ)·E); rounding against the (tied) embedding table.

#include <drdiff/anchor/guidance.hpp>
#include <drdiff/anchor/projectors.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/router/routers.hpp>
#include <drdiff/solver/dpmpp.hpp>
#include <drdiff/solver/grid.hpp>
#include <drdiff/solver/noise_schedule.hpp>

#include <cstdint>

DRDIFF_NAMESPACE_BEGIN

enum class ffn_activation { gelu, swiglu };

/// What the network's last layer gives the solver as x̂0:
/// - `embedding`: z = down(LN(h)) itself (DiffuSeq's regression target);
/// - `categorical`: softmax(z·Eᵀ)·E, the expectation of the tied table E under the logits z·Eᵀ
///   (CDCD's score interpolation; trained with cross-entropy on the logits).
enum class prediction { embedding, categorical };

struct model_sizes {
  int vocab = 256;       ///< V (256: the byte-level tokenizer)
  int embed_dim = 16;    ///< d_e, the diffusion space (DiffuSeq: 128)
  int d_model = 128;
  int heads = 2;         ///< head_dim = d_model / heads (CPU: 32..256, a multiple of 8; GPU: 64 or 128)
  int blocks = 2;
  int experts = 4;
  int d_ff = 256;        ///< per expert
  int shared_experts = 0;
  int time_dim = 32;     ///< width of the sinusoidal time features (even)
  /// Self-conditioning: the input is up(x_t) + up_sc(x̂0_prev), the previous solver step's estimate
  /// (zeros at the first step); adds the tensor up_sc.weight [d_model, embed_dim] (docs/weights.md).
  bool self_condition = false;

  int head_dim() const noexcept { return heads > 0 ? d_model / heads : 0; }
  void validate() const {
    DRDIFF_CHECK(vocab > 0, "model: vocab = ", vocab, " must be > 0");
    DRDIFF_CHECK(embed_dim > 0, "model: embed_dim = ", embed_dim, " must be > 0");
    DRDIFF_CHECK(heads > 0 && d_model > 0 && d_model % heads == 0, "model: d_model = ", d_model,
                 " must be a positive multiple of heads = ", heads);
    DRDIFF_CHECK(head_dim() >= 32 && head_dim() <= 256 && head_dim() % 8 == 0, "model: head_dim = d_model / heads = ",
                 head_dim(), " must be a multiple of 8 in 32..256");
    DRDIFF_CHECK(blocks >= 1, "model: blocks = ", blocks, " must be >= 1");
    DRDIFF_CHECK(experts >= 1 && experts <= router::max_experts, "model: experts = ", experts, " must be in 1..",
                 router::max_experts);
    DRDIFF_CHECK(d_ff > 0, "model: d_ff = ", d_ff, " must be > 0");
    DRDIFF_CHECK(shared_experts >= 0, "model: shared_experts = ", shared_experts, " must be >= 0");
    DRDIFF_CHECK(time_dim > 0 && time_dim % 2 == 0, "model: time_dim = ", time_dim, " must be even and > 0");
  }
  /// Parameters used per token: attention, the router, k routed experts and the shared ones, the
  /// projections and the time MLP (the embedding table is a lookup, counted apart).
  /// `mats`: matrices per expert (2 for GELU, 3 for SwiGLU).
  std::int64_t active_parameters(int k, int mats = 2) const noexcept {
    std::int64_t const dm = d_model, ff = d_ff;
    std::int64_t const per_block =
        4 * dm * dm + experts * (dm + 1) + std::int64_t(k + shared_experts) * mats * dm * ff + 4 * dm;
    return blocks * per_block + (self_condition ? 3 : 2) * dm * embed_dim + dm + embed_dim + time_dim * dm + dm * dm +
           2 * dm + 2 * dm;
  }
};

/// A model type's choices: Attention is any attention policy, Router any router functor.
template <class Attention = attn::hsa, class Router = router::top_k>
struct model_config {
  using attention_policy = Attention;
  using router_type = Router;

  model_sizes sizes{};
  Attention attention{};
  Router router{};
  ffn_activation activation = ffn_activation::gelu;
  double rope_base = 10000.0;
  float norm_eps = 1e-5f;
  prediction output = prediction::embedding;

  // Sampling: DiffuSeq's sqrt schedule, a uniform-t grid from t_start to t_end.
  solver::vp_sqrt schedule{};
  double t_start = 0.99, t_end = 0.0;
  solver::spacing spacing = solver::spacing::uniform_t;
  solver::dpmpp_config solver{};  ///< DPM-Solver++ 2M by default
  int steps = 10;
  anchor::metric rounding = anchor::metric::dot;  ///< the tied lm_head's arg-max (DiffuSeq)
  bool guidance = false;                          ///< clamp guidance toward the nearest embedding
  anchor::guidance_schedule guidance_schedule{};

  void validate() const {
    sizes.validate();
    solver.validate();
    DRDIFF_CHECK(steps >= 1, "model: steps = ", steps, " must be >= 1");
    DRDIFF_CHECK(t_end >= schedule.t_min && t_end < t_start && t_start < schedule.t_max, "model: the time range t_start = ",
                 t_start, " → t_end = ", t_end, " must lie in [", schedule.t_min, ", ", schedule.t_max, ") and decrease");
    DRDIFF_CHECK(rope_base > 1.0, "model: rope_base = ", rope_base, " must be > 1");
    router.validate(sizes.experts);
    guidance_schedule.validate();
  }
};

namespace presets {

/// For tests: 2 blocks of d_model 128 (2 heads of 64), 4 experts top-2 of FFN 256, d_e = 16.
inline model_config<> tiny() { return {}; }

/// For CPU benchmarks: 4 blocks of d_model 256 (4 heads of 64), 8 experts top-2 of FFN 512.
inline model_config<> small() {
  model_config<> c;
  c.sizes = {256, 64, 256, 4, 4, 8, 512, 0, 64};
  return c;
}

/// The paper's scale and the end-to-end benchmark's configuration (shared/notes/end_to_end.md): 12
/// blocks of d_model 1024 (16 heads of 64), 8 experts top-2 of FFN 2816, d_e = 128; about 190M
/// active parameters.
inline model_config<> base() {
  model_config<> c;
  c.sizes = {256, 128, 1024, 16, 12, 8, 2816, 0, 128};
  return c;
}

}  // namespace presets

DRDIFF_NAMESPACE_END
