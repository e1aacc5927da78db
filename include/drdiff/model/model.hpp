#pragma once
/// \file
/// drdiff::model<Backend, Config>: the DrDiff denoiser (model/config.hpp describes the network),
/// written once. The block sequence, the tensor names, the generation pipeline (noise → DPM-Solver++
/// with the anchor hooks → rounding) and the public API live here, over a small set of layer
/// operations that each backend provides as detail::model_layers<Backend>:
///
///   linear layers (the input and output projections, qkv, the attention output), LayerNorm, RoPE,
///   attention, the routed MoE, the time embedding, the categorical prediction, the solver loop,
///   the anchor projector and rounding, and the backend's timer and memory for generation.
///
/// The CPU's are in <drdiff/cpu/model.hpp>, the GPU's in <drdiff/cuda/model.cuh> (from a .cu file;
/// link CUDA::cublas). Both backends have one constructor and one call signature:
///
///   model<cpu, model_config<>> m(cfg);            // zero weights; or m(cfg, weights)
///   m.load("model.safetensors");                  // or init_random(seed), tensor(name)[i] = ...
///   m.forward(ctx, x_t, t, x0, batch, seq);       // pointers in the backend's memory
///   auto r = m.generate(ctx, request);            // tokens on the host
///
/// The weights are kept on the host in fp32 (model_weights). The GPU model uploads them (matrices as
/// bf16) when it is built with weights, and again at the next forward or generate after any
/// non-const access to them (weights(), tensor(name), load, init_random): read them through a const
/// model to avoid that, and call again after writing through a reference kept from before. Change the
/// weights between calls, not during one (a generation binds them once, at its start). A model's
/// calls run one at a time: its buffers are shared.

#include <drdiff/anchor/guidance.hpp>
#include <drdiff/anchor/projectors.hpp>
#include <drdiff/attention/distributed.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/core/distributed.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/model/config.hpp>
#include <drdiff/model/parameters.hpp>
#include <drdiff/model/safetensors.hpp>
#include <drdiff/model/weights.hpp>
#include <drdiff/solver/grid.hpp>
#include <drdiff/solver/noise_schedule.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

/// Wall-clock seconds spent per component (accumulated over calls; reset by the caller).
struct model_timing {
  double attention = 0, moe = 0, dense = 0, solver = 0, rounding = 0;
  double total() const noexcept { return attention + moe + dense + solver + rounding; }
};

/// What to generate: `length` new tokens after the prompt, from the noise of `seed`.
struct generation_request {
  std::vector<int> prompt;  ///< token ids kept clean (DiffuSeq-style conditioning)
  int length = 64;
  std::uint64_t seed = 0;
  /// Called after each solver step with (step + 1, steps); may be empty.
  std::function<void(int, int)> progress;
  /// Split the time by component (generation_result::timing). The CPU always does (a clock read);
  /// the GPU then puts CUDA events around each component and synchronises, which is slower.
  bool time_components = false;
};

struct generation_result {
  std::vector<int> tokens;  ///< the generated tokens (without the prompt)
  int steps = 0, evaluations = 0;
  double seconds = 0;
  model_timing timing{};
};

namespace detail {

/// The layer operations of a backend (see the file comment); specialised in cpu/model.hpp and
/// cuda/model.cuh.
template <class Backend>
class model_layers {
  static_assert(!std::is_same_v<Backend, Backend>,
                "drdiff::model<Backend, Config>: no layers for this backend. For drdiff::cpu include "
                "<drdiff/cpu/model.hpp>; for drdiff::cuda include <drdiff/cuda.cuh> (or <drdiff/cuda/model.cuh>) "
                "from a .cu file and link CUDA::cublas.");
};

/// What the layers need of a model type besides its tensors (the same for every Config).
struct network_spec {
  model_sizes sizes{};
  ffn_activation activation = ffn_activation::gelu;
  double rope_base = 10000.0;
  float norm_eps = 1e-5f;
  prediction output = prediction::embedding;

  template <class Config>
  static network_spec of(Config const& c) {
    return {c.sizes, c.activation, c.rope_base, c.norm_eps, c.output};
  }
};

/// What both backends build before sampling: the request checked against the vocabulary, the
/// target flags (0 = prompt, kept clean) and the clean embeddings of the prompt positions.
struct generation_layout {
  int prompt = 0, tokens = 0;
  std::vector<unsigned char> target;
  std::vector<float> clean;

  generation_layout(generation_request const& req, int vocab, float const* embed, int dim)
      : prompt(int(req.prompt.size())), tokens(int(req.prompt.size()) + req.length) {
    DRDIFF_CHECK(req.length >= 1, "generate: length = ", req.length, " must be >= 1");
    for (std::size_t i = 0; i < req.prompt.size(); ++i)
      DRDIFF_CHECK(req.prompt[i] >= 0 && req.prompt[i] < vocab, "generate: prompt token ", i, " = ", req.prompt[i],
                   " is outside the vocabulary 0..", vocab - 1);
    target.assign(std::size_t(tokens), 1);
    clean.assign(std::size_t(tokens) * dim, 0.f);
    for (int i = 0; i < prompt; ++i) {
      target[std::size_t(i)] = 0;
      float const* row = embed + std::size_t(req.prompt[std::size_t(i)]) * dim;
      std::copy(row, row + dim, clean.begin() + std::ptrdiff_t(i) * dim);
    }
  }
};

/// Seconds since t0 on the steady clock.
inline double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace detail

template <class Backend, class Config>
class model {
 public:
  using backend_type = Backend;
  using config_type = Config;
  using layers_type = detail::model_layers<Backend>;

  /// All weights zero (set them with load, init_random or tensor()).
  explicit model(Config cfg)
      : cfg_((cfg.validate(), std::move(cfg))), w_(cfg_.sizes, cfg_.activation), layers_(detail::network_spec::of(cfg_)) {}
  /// These weights; their tensors must be the config's (names and shapes), else a drdiff::error names
  /// the first that differs.
  model(Config cfg, model_weights w)
      : cfg_((cfg.validate(), std::move(cfg))), w_(std::move(w)), layers_(detail::network_spec::of(cfg_)) {
    auto const want = parameter_specs(cfg_.sizes, cfg_.activation);
    auto const& got = w_.specs();
    DRDIFF_CHECK(got.size() == want.size(), "model: the weights have ", got.size(), " tensors but the config needs ",
                 want.size());
    for (std::size_t i = 0; i < want.size(); ++i)
      DRDIFF_CHECK(got[i].name == want[i].name && got[i].shape == want[i].shape, "model: weight tensor ", i, " '",
                   got[i].name, "' is not the config's '", want[i].name, "' of the same shape");
    layers();  // the GPU uploads them now, not inside the first (timed) call
  }

  Config const& config() const noexcept { return cfg_; }
  std::vector<parameter_spec> const& parameters() const noexcept { return w_.specs(); }
  /// The host copy of the weights. Non-const access marks them changed: the GPU model uploads them
  /// again at its next forward.
  model_weights const& weights() const noexcept { return w_; }
  model_weights& weights() noexcept {
    stale_ = true;
    return w_;
  }
  std::vector<float> const& tensor(std::string const& name) const { return w_.tensor(name); }
  std::vector<float>& tensor(std::string const& name) {
    stale_ = true;
    return w_.tensor(name);
  }
  void init_random(std::uint64_t seed) {
    stale_ = true;
    w_.init_random(seed);
  }
  void load(safetensors::file const& f) {
    stale_ = true;
    w_.load(f);
  }
  void load(std::string const& path) {
    stale_ = true;
    w_.load(path);
  }
  void save(std::string const& path, safetensors::dtype type = safetensors::dtype::f32) const { w_.save(path, type); }

  /// x̂0 = model(x_t, t) for `batch` sequences of `seq` tokens ([batch, seq, embed_dim] fp32,
  /// row-major, in the backend's memory). With `timing`, the components' times are added to it (on
  /// the GPU with CUDA events: the call then synchronises). A self-conditioned model
  /// (sizes.self_condition) also takes its previous estimate `maybe_x0_prev` (same shape; null: none
  /// yet, i.e. zeros); for any other model it must be null.
  void forward(context<Backend> const& ctx, float const* xt, double t, float* x0, int batch, int seq,
               model_timing* timing = nullptr, float const* maybe_x0_prev = nullptr) {
    DRDIFF_CHECK(maybe_x0_prev == nullptr || cfg_.sizes.self_condition,
                 "model: x0_prev is given but the model is not self-conditioned (sizes.self_condition = false)");
    layers();
    forward_bound(ctx, xt, t, x0, batch, seq, timing, maybe_x0_prev);
  }

  /// The same for this rank's chunk of `batch` sequences of `seq` tokens split over the ranks of `d`
  /// (sequence parallelism): xt, x0 and maybe_x0_prev hold the chunk's rows, [batch, chunk, embed_dim]
  /// with chunk = attn::sequence_chunk(seq, ranks, rank). Every rank holds every weight; attention runs
  /// as drdiff::distributed_attention, everything else per token on the rank's rows (RoPE at their
  /// positions in the whole sequence). Collective: every rank calls it with the same t, batch and seq.
  template <class Comm>
  void forward(distributed_context<Backend, Comm> const& d, float const* xt, double t, float* x0, int batch, int seq,
               model_timing* timing = nullptr, float const* maybe_x0_prev = nullptr) {
    DRDIFF_CHECK(d.comm != nullptr, "model: the distributed context's comm is a null pointer");
    DRDIFF_CHECK(maybe_x0_prev == nullptr || cfg_.sizes.self_condition,
                 "model: x0_prev is given but the model is not self-conditioned (sizes.self_condition = false)");
    DRDIFF_CHECK(seq > 0, "model: seq = ", seq, " must be > 0");
    attn::chunk const c = attn::sequence_chunk(seq, d.comm->size(), d.comm->rank());
    layers();
    forward_bound(d.local, xt, t, x0, batch, c.size(), timing, maybe_x0_prev,
                  [&](layers_type& L) { L.attention(d, cfg_.attention, seq); }, c.begin);
  }

  /// Noise → DPM-Solver++ (cfg.steps; hooks: the optional clamp guidance, the prompt kept clean) →
  /// rounding against the embedding table. A self-conditioned model gets, at each evaluation, its raw
  /// estimate of the one before (none at the first). Deterministic for a seed (on the CPU whatever the thread
  /// count; on the GPU for a given device and build).
  generation_result generate(context<Backend> const& ctx, generation_request const& req) {
    auto const start = std::chrono::steady_clock::now();
    auto const& s = cfg_.sizes;
    detail::generation_layout const lay(req, s.vocab, w_.tensor("embed.weight").data(), s.embed_dim);
    int const P = lay.prompt, N = lay.tokens, de = s.embed_dim;
    std::size_t const n = std::size_t(N) * de;
    anchor::token_shape const shape{1, N, de};
    auto& L = layers();  // bound once: the generation keeps these weights, whatever its callbacks do
    auto g = L.begin_generation(ctx, lay, req.seed, "absorbing");  // x: noise + m on targets, clean elsewhere

    generation_result res;
    bool const timed = layers_type::cheap_timing || req.time_components;
    auto const ops = solver::ops(cfg_.schedule);
    auto const grid = solver::make_grid(ops, cfg_.steps, cfg_.spacing, cfg_.t_start, cfg_.t_end);
    bool const self_cond = cfg_.sizes.self_condition;
    auto den = [&](float const* xs, double t, float* out) {
      forward_bound(ctx, xs, t, out, 1, N, timed ? &res.timing : nullptr,
                    self_cond && res.evaluations > 0 ? g.prev : nullptr);
      if (self_cond) L.copy(ctx, out, g.prev, n);  // before the hooks change it: the raw estimate
      ++res.evaluations;
    };
    anchor::keep_clean<Backend, float> keep(ctx, shape, g.target, g.clean);
    anchor::nearest_embedding<float> const table{L.weight("embed.weight"), s.vocab, de, cfg_.rounding};
    auto guide = anchor::make_guidance(ctx, shape, L.projector(ctx, table, shape), cfg_.guidance_schedule, ops,
                                       g.guide_scratch);
    auto x0_hook = [&](float* x0, double t, int step) {
      if (cfg_.guidance) guide(x0, t, step);
      keep(x0, t, step);
    };
    auto xt_hook = [&](float* xs, double t, int step) {
      keep(xs, t, step);
      if (req.progress) {
        L.synchronize(ctx);  // the step has finished when progress hears of it
        req.progress(step + 1, cfg_.steps);
      }
    };
    double const before = res.timing.total();
    auto const t_solve = std::chrono::steady_clock::now();
    L.sample(ctx, ops, cfg_.solver, grid, den, g.x, n, g.workspace, x0_hook, xt_hook);
    double const solve = detail::seconds_since(t_solve);
    if (timed) res.timing.solver += std::max(0.0, solve - (res.timing.total() - before));  // updates and hooks
    auto const t_round = std::chrono::steady_clock::now();
    std::vector<int> const ids = L.round(ctx, table, shape, g.x);  // synchronises
    res.timing.rounding += detail::seconds_since(t_round);
    res.tokens.assign(ids.begin() + P, ids.end());
    res.steps = cfg_.steps;
    res.seconds = detail::seconds_since(start);
    return res;
  }

 private:
  Config cfg_;
  model_weights w_;
  layers_type layers_;
  bool stale_ = true;

  /// The forward pass on the layers as they are bound.
  void forward_bound(context<Backend> const& ctx, float const* xt, double t, float* x0, int batch, int seq,
                     model_timing* timing, float const* maybe_x0_prev = nullptr) {
    forward_bound(ctx, xt, t, x0, batch, seq, timing, maybe_x0_prev,
                  [&](layers_type& L) { L.attention(ctx, cfg_.attention); });
  }
  /// `attend(L)` runs the attention of a block; the rows start at position `pos0` of the sequence.
  template <class Attend>
  void forward_bound(context<Backend> const& ctx, float const* xt, double t, float* x0, int batch, int seq,
                     model_timing* timing, float const* maybe_x0_prev, Attend&& attend, int pos0 = 0) {
    DRDIFF_CHECK(batch > 0 && seq > 0, "model: batch = ", batch, " and seq = ", seq, " must be > 0");
    DRDIFF_CHECK(xt != nullptr && x0 != nullptr, "model: x_t or x0 is a null pointer");
    DRDIFF_CHECK(std::isfinite(t), "model: t = ", t, " is not finite");
    auto& L = layers_;
    L.prepare(ctx, cfg_.attention, cfg_.router, batch, seq, pos0);
    auto clock = L.clock(ctx, timing);
    clock.begin();
    L.time_embedding(ctx, t, "time.fc1", "time.fc2");
    L.input(ctx, xt, "up", maybe_x0_prev, "up_sc");  // h = up(x_t) [+ up_sc(x̂0_prev)] + the time embedding
    clock.end(&model_timing::dense);
    for (int b = 0; b < cfg_.sizes.blocks; ++b) {
      std::string const pre = "blocks." + std::to_string(b) + ".";
      clock.begin();
      L.norm(ctx, pre + "norm1");                // ln = LayerNorm(h)
      L.qkv(ctx, pre + "attn.qkv.weight");       // qkv = ln·Wᵀ, RoPE on q and k
      clock.end(&model_timing::dense);
      clock.begin();
      attend(L);                                 // att = attention(q, k, v) under the policy
      clock.end(&model_timing::attention);
      clock.begin();
      L.project_add(ctx, pre + "attn.out.weight");  // h += att·Wᵀ
      L.norm(ctx, pre + "norm2");
      clock.end(&model_timing::dense);
      clock.begin();
      L.ffn(ctx, cfg_.router, pre, t);           // h += MoE(ln) (routed and shared experts)
      clock.end(&model_timing::moe);
    }
    clock.begin();
    L.norm(ctx, "norm");
    L.output(ctx, x0, "down", "embed.weight");  // x0 = down(ln); categorical: softmax(x0·Eᵀ)·E
    clock.end(&model_timing::dense);
    clock.finish();
  }

  /// The layers, told of the current weights (the GPU's uploads them when they changed).
  layers_type& layers() {
    layers_.bind(w_, stale_);
    stale_ = false;
    return layers_;
  }
};

DRDIFF_NAMESPACE_END
