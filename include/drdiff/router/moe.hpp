#pragma once
/// \file
/// The routed mixture-of-experts FFN, one API for both backends: router::moe_args<T> (shapes, tensors
/// and options of one call), router::moe_workspace_bytes(ctx, router, args) and
/// router::moe_forward(ctx, router, args, workspace, bytes). Portable; the backends specialise
/// drdiff::detail::moe_impl<Backend> (cpu/moe.hpp: float on the host; cuda/moe.cuh: float and
/// __nv_bfloat16 on the device, needs CUDA::cublas).
///
/// The output of token t is Σ_j w_j · FFN_{e_j}(x_t), summed in the token's selection order (no
/// atomics: it does not depend on thread timing), plus the shared experts' sum.

#include <drdiff/core/backend.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/core/traits.hpp>
#include <drdiff/router/routers.hpp>

#include <cmath>
#include <cstddef>

DRDIFF_NAMESPACE_BEGIN
namespace router {

/// The experts' activation: GELU (erf), or SwiGLU (silu(gate) ⊙ up).
enum class activation { gelu, swiglu };

/// How the GPU issues the expert GEMMs (the CPU ignores it): one cuBLAS GEMM per expert, one grouped
/// GEMM per projection, one strided batched GEMM over every expert's rows padded to the largest
/// expert (used only when the padding fits the workspace's slack), or automatic: the thresholds of
/// cuda/tuning.cuh (cuda_moe_tuning).
enum class moe_gemm_mode { automatic, per_expert, grouped, padded_batched };

/// Per-phase times of one moe_forward call on the GPU (milliseconds, CUDA events; asking for them adds
/// one synchronisation at the end of the call). The CPU leaves them untouched.
struct moe_timing {
  float route_ms = 0;     ///< router GEMM, routing kernel, sort, histogram, the row-count copy
  float dispatch_ms = 0;  ///< slot inversion and the gather of token rows into expert order
  float experts_ms = 0;   ///< the expert GEMMs and the activation (= gemm_ms + activation_ms)
  float gemm_ms = 0;      ///< the expert GEMMs alone (up, gate and down projections)
  float activation_ms = 0;
  float combine_ms = 0;   ///< the weighted combine in selection order
  double dispatch_bytes = 0, combine_bytes = 0;  ///< bytes the gather and the combine move
};

/// Shapes, tensors and options of one MoE call; row-major, memory of the context's backend (host
/// for drdiff::cpu, device for drdiff::cuda). T: float on the CPU; float or __nv_bfloat16 on the GPU
/// (fp32 accumulation; the router functor runs in fp32).
template <class T = float>
struct moe_args {
  int tokens = 0, d_model = 0, d_ff = 0, experts = 0;
  T const* x = nullptr;             ///< [tokens × d_model]
  T const* w_router = nullptr;      ///< [experts × d_model]: logits s(h) = W·h + b, accumulated in fp32
  float const* b_router = nullptr;  ///< [experts], optional
  T const* w_up = nullptr;          ///< [experts × d_ff × d_model]
  T const* w_gate = nullptr;        ///< [experts × d_ff × d_model], SwiGLU only: act = silu(gate) ⊙ up
  T const* w_down = nullptr;        ///< [experts × d_model × d_ff]
  T* out = nullptr;                 ///< [tokens × d_model]; exactly one of out and residual is set
  /// Optional fp32 [tokens × d_model]: the output is added to it (a residual stream, the add fused
  /// into the combine) instead of being written to `out`.
  float* residual = nullptr;
  activation act = activation::gelu;
  int shared_experts = 0;                ///< always-on experts added to every token with weight 1 (DeepSeekMoE)
  T const* w_shared_up = nullptr;        ///< [shared × d_ff × d_model]
  T const* w_shared_gate = nullptr;      ///< [shared × d_ff × d_model], SwiGLU only
  T const* w_shared_down = nullptr;      ///< [shared × d_model × d_ff]
  float capacity_factor = 0.f;  ///< 0: dropless; > 0: each expert keeps its first ⌈cf·T·k/E⌉ rows, in token order
  float timestep = 0.f;                       ///< passed to the router (token_info::timestep)
  float const* maybe_token_scores = nullptr;  ///< [tokens], passed as token_info::score (0 when null)
  moe_stats* maybe_stats = nullptr;    ///< host: the call's statistics (counts, balance and z losses, drops)
  moe_timing* maybe_timing = nullptr;  ///< host: the GPU's per-phase times
  moe_gemm_mode gemm_mode = moe_gemm_mode::automatic;  ///< how the GPU issues its expert GEMMs
};

}  // namespace router

namespace detail {

/// Primary template: exists only to fail with a readable message.
template <class Backend, class = void>
struct moe_impl {
  static_assert(dependent_false<Backend>,
                "drdiff::router::moe_forward: no implementation for this backend. For drdiff::cpu include "
                "<drdiff/drdiff.hpp> (or <drdiff/cpu/moe.hpp>); for drdiff::cuda include <drdiff/cuda.cuh> (or "
                "<drdiff/cuda/moe.cuh>) in a .cu file and link CUDA::cublas.");
};

/// The checks every backend makes before any work.
template <class T>
void check_moe_args(router::moe_args<T> const& a) {
  DRDIFF_CHECK(a.experts > 0 && a.experts <= router::max_experts, "moe: experts E = ", a.experts, " must be in 1..",
               router::max_experts);
  DRDIFF_CHECK(a.tokens >= 0, "moe: tokens = ", a.tokens, " must be >= 0");
  DRDIFF_CHECK(a.d_model > 0, "moe: d_model = ", a.d_model, " must be > 0");
  DRDIFF_CHECK(a.d_ff > 0, "moe: d_ff = ", a.d_ff, " must be > 0");
  DRDIFF_CHECK(a.x && a.w_router && a.w_up && a.w_down && (a.out || a.residual),
               "moe: x, w_router, w_up, w_down and out (or residual) must be set");
  DRDIFF_CHECK(!(a.out && a.residual), "moe: out and residual are both set; the output goes to one of them");
  DRDIFF_CHECK(a.act != router::activation::swiglu || a.w_gate, "moe: SwiGLU needs w_gate");
  DRDIFF_CHECK(a.shared_experts >= 0, "moe: shared_experts = ", a.shared_experts, " must be >= 0");
  DRDIFF_CHECK(a.shared_experts == 0 || (a.w_shared_up && a.w_shared_down &&
                                         (a.act != router::activation::swiglu || a.w_shared_gate)),
               "moe: shared_experts = ", a.shared_experts, " but the shared expert weights are not set");
  DRDIFF_CHECK(std::isfinite(a.capacity_factor) && a.capacity_factor >= 0.f, "moe: capacity_factor = ",
               a.capacity_factor, " must be >= 0 (0 = dropless)");
}

}  // namespace detail

namespace router {

/// Bytes of workspace moe_forward needs for these arguments (query first, CUB style). 0 on the CPU,
/// which allocates its own.
template <class Backend, class Router, class T>
std::size_t moe_workspace_bytes(context<Backend> const& ctx, Router const& r, moe_args<T> const& a) {
  static_assert(is_backend_v<Backend>, "drdiff::router::moe_workspace_bytes: Backend must be drdiff::cpu or drdiff::cuda.");
  return drdiff::detail::moe_impl<Backend>::workspace_bytes(ctx, r, a);
}

/// The routed MoE FFN with router `r` (a token-choice functor, or router::expert_choice) on the
/// backend of `ctx`; `workspace` holds moe_workspace_bytes(...) bytes (the GPU needs it; the CPU
/// allocates its own when it is null). Returns the number of selections the capacity limit dropped
/// (0 when dropless). Bad arguments throw drdiff::error before any work starts.
template <class Backend, class Router, class T>
int moe_forward(context<Backend> const& ctx, Router const& r, moe_args<T> const& a, void* workspace = nullptr,
                std::size_t workspace_bytes = 0) {
  static_assert(is_backend_v<Backend>, "drdiff::router::moe_forward: Backend must be drdiff::cpu or drdiff::cuda.");
  return drdiff::detail::moe_impl<Backend>::forward(ctx, r, a, workspace, workspace_bytes);
}
/// Guards the old call moe_forward(ctx, router, args, &stats): the statistics are moe_args::maybe_stats.
template <class Backend, class Router, class T>
int moe_forward(context<Backend> const&, Router const&, moe_args<T> const&, moe_stats*) {
  static_assert(drdiff::detail::dependent_false<Backend>,
                "drdiff::router::moe_forward: the 4th argument is the workspace; ask for statistics with "
                "moe_args::maybe_stats.");
  return 0;
}

}  // namespace router
DRDIFF_NAMESPACE_END
