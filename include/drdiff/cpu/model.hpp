#pragma once
/// \file
/// The DrDiff model on the CPU: fp32 weights and activations, linear layers through Eigen, attention
/// through drdiff::attention (any policy), the routed MoE through router::moe_forward, sampling with
/// solver::dpmpp_sample, anchor guidance and re-anchoring hooks, and rounding by
/// anchor::round_to_nearest against the tied embedding table.

#include <drdiff/anchor/guidance.hpp>
#include <drdiff/attention/args.hpp>
#include <drdiff/attention/attention.hpp>
#include <drdiff/cpu/anchor.hpp>
#include <drdiff/cpu/attention.hpp>
#include <drdiff/cpu/detail/linear.hpp>
#include <drdiff/cpu/detail/parallel.hpp>
#include <drdiff/cpu/moe.hpp>
#include <drdiff/cpu/solver.hpp>
#include <drdiff/model/model.hpp>
#include <drdiff/model/parameters.hpp>
#include <drdiff/model/safetensors.hpp>
#include <drdiff/model/weights.hpp>
#include <drdiff/solver/grid.hpp>
#include <drdiff/solver/noise.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// LayerNorm over the last dimension (statistics in double).
inline void layer_norm_rows(context<cpu> const& ctx, float const* x, std::int64_t rows, int d, float const* g,
                            float const* b, float eps, float* y) {
  std::int64_t const chunk = 256;
  parallel_for(resolve_threads(ctx.num_threads), (rows + chunk - 1) / chunk, [&](std::int64_t c, int) {
    for (std::int64_t r = c * chunk; r < std::min(rows, (c + 1) * chunk); ++r) {
      float const* xr = x + r * d;
      double mean = 0, var = 0;
      for (int k = 0; k < d; ++k) mean += xr[k];
      mean /= d;
      for (int k = 0; k < d; ++k) var += (xr[k] - mean) * (xr[k] - mean);
      var /= d;
      float const inv = float(1.0 / std::sqrt(var + eps));
      for (int k = 0; k < d; ++k) y[r * d + k] = (xr[k] - float(mean)) * inv * g[k] + b[k];
    }
  });
}

/// Rows of logits the categorical prediction computes per worker at a time.
inline constexpr std::int64_t categorical_chunk = 64;

/// x̂0 = softmax(z·Eᵀ)·E per row, in place on z [rows × d] (E: [vocab × d], row-major): the
/// categorical data prediction. `scratch` holds categorical_chunk × vocab floats per worker of
/// resolve_threads(ctx.num_threads). The row max propagates NaN, so a NaN in a row's logits makes
/// the whole row NaN (never a plausible row).
inline void categorical_rows(context<cpu> const& ctx, float* z, std::int64_t rows, int d, float const* E,
                             int vocab, float* scratch) {
  using matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::int64_t const chunk = categorical_chunk;
  Eigen::Map<matrix const> W(E, vocab, d);
  parallel_for(resolve_threads(ctx.num_threads), (rows + chunk - 1) / chunk, [&](std::int64_t c, int w) {
    std::int64_t const r0 = c * chunk, n = std::min(chunk, rows - r0);
    Eigen::Map<matrix> Z(z + r0 * d, n, d);
    Eigen::Map<matrix> L(scratch + std::size_t(w) * chunk * vocab, n, vocab);
    L.noalias() = Z * W.transpose();
    for (std::int64_t r = 0; r < n; ++r) {
      auto row = L.row(r).array();
      float const mx = row.template maxCoeff<Eigen::PropagateNaN>();
      row = (row - mx).exp();
      row /= row.sum();
    }
    Z.noalias() = L * W;
  });
}

}  // namespace detail

template <class Config>
class model<cpu, Config> {
 public:
  using config_type = Config;

  explicit model(Config cfg) : cfg_(std::move(cfg)), w_((cfg_.validate(), cfg_.sizes), cfg_.activation) {}

  Config const& config() const noexcept { return cfg_; }
  model_weights& weights() noexcept { return w_; }
  model_weights const& weights() const noexcept { return w_; }
  std::vector<parameter_spec> const& parameters() const noexcept { return w_.specs(); }
  std::vector<float>& tensor(std::string const& name) { return w_.tensor(name); }
  std::vector<float> const& tensor(std::string const& name) const { return w_.tensor(name); }
  void init_random(std::uint64_t seed) { w_.init_random(seed); }
  void load(safetensors::file const& f) { w_.load(f); }
  void load(std::string const& path) { w_.load(path); }
  void save(std::string const& path, safetensors::dtype type = safetensors::dtype::f32) const { w_.save(path, type); }

  /// x̂0 = model(x_t, t) for `batch` sequences of `seq` tokens ([batch, seq, embed_dim], row-major).
  void forward(context<cpu> const& ctx, float const* xt, double t, float* x0, int batch, int seq,
               model_timing* timing = nullptr) {
    DRDIFF_CHECK(batch > 0 && seq > 0, "model: batch = ", batch, " and seq = ", seq, " must be > 0");
    DRDIFF_CHECK(xt != nullptr && x0 != nullptr, "model: x_t or x0 is a null pointer");
    DRDIFF_CHECK(std::isfinite(t), "model: t = ", t, " is not finite");
    auto const& s = cfg_.sizes;
    int const dm = s.d_model, de = s.embed_dim, hd = s.head_dim();
    std::int64_t const T = std::int64_t(batch) * seq;
    reserve(T, seq);
    auto clock = [] { return std::chrono::steady_clock::now(); };
    auto since = [&](auto t0) { return std::chrono::duration<double>(clock() - t0).count(); };
    auto t0 = clock();
    // Input: up-projection plus the time embedding.
    time_embedding(ctx, t);
    detail::linear_rows(ctx, xt, T, de, p("up.weight"), dm, p("up.bias"), h_.data(), false);
    for (std::int64_t r = 0; r < T; ++r)
      for (int k = 0; k < dm; ++k) h_[std::size_t(r) * dm + k] += temb_[std::size_t(k)];
    if (timing) timing->dense += since(t0);
    for (int b = 0; b < s.blocks; ++b) {
      std::string const pre = "blocks." + std::to_string(b) + ".";
      t0 = clock();
      detail::layer_norm_rows(ctx, h_.data(), T, dm, p(pre + "norm1.weight"), p(pre + "norm1.bias"), cfg_.norm_eps,
                              ln_.data());
      detail::linear_rows(ctx, ln_.data(), T, dm, p(pre + "attn.qkv.weight"), 3 * dm, nullptr, qkv_.data(), false);
      rope(ctx, T, seq);
      if (timing) timing->dense += since(t0);
      t0 = clock();
      attention_args<float> a{};
      a.batch = batch; a.seq = seq; a.heads = s.heads; a.head_dim = hd;
      tensor_strides const st{std::int64_t(seq) * 3 * dm, 3 * dm, hd};
      a.q = qkv_.data(); a.k = qkv_.data() + dm; a.v = qkv_.data() + 2 * dm;
      a.q_strides = a.k_strides = a.v_strides = st;
      a.o = att_.data();
      a.o_strides = packed_strides(seq, s.heads, hd);
      std::size_t const need = attention_workspace_bytes(ctx, cfg_.attention, a);
      if (attn_ws_.size() < need) attn_ws_.resize(need);
      attention(ctx, cfg_.attention, a, attn_ws_.data(), attn_ws_.size());
      if (timing) timing->attention += since(t0);
      t0 = clock();
      detail::linear_rows(ctx, att_.data(), T, dm, p(pre + "attn.out.weight"), dm, nullptr, h_.data(), true);
      detail::layer_norm_rows(ctx, h_.data(), T, dm, p(pre + "norm2.weight"), p(pre + "norm2.bias"), cfg_.norm_eps,
                              ln_.data());
      if (timing) timing->dense += since(t0);
      t0 = clock();
      router::moe_args m;
      auto const tensor = [&](std::string const& n) { return p(n); };
      detail::bind_moe_weights(m, pre, s, cfg_.activation, tensor, tensor);
      m.tokens = int(T);
      m.x = ln_.data(); m.out = ffn_.data();
      m.act = cfg_.activation == ffn_activation::swiglu ? router::activation::swiglu : router::activation::gelu;
      m.timestep = float(t);
      router::moe_forward(ctx, cfg_.router, m);
      for (std::int64_t i = 0; i < T * dm; ++i) h_[std::size_t(i)] += ffn_[std::size_t(i)];
      if (timing) timing->moe += since(t0);
    }
    t0 = clock();
    detail::layer_norm_rows(ctx, h_.data(), T, dm, p("norm.weight"), p("norm.bias"), cfg_.norm_eps, ln_.data());
    detail::linear_rows(ctx, ln_.data(), T, dm, p("down.weight"), de, p("down.bias"), x0, false);
    if (cfg_.output == prediction::categorical) {
      std::size_t const need = std::size_t(detail::resolve_threads(ctx.num_threads)) * detail::categorical_chunk * s.vocab;
      if (cat_ws_.size() < need) cat_ws_.resize(need);
      detail::categorical_rows(ctx, x0, T, de, p("embed.weight"), s.vocab, cat_ws_.data());
    }
    if (timing) timing->dense += since(t0);
  }

  /// Noise → DPM-Solver++ (cfg.steps, hooks: optional clamp guidance, the prompt kept clean) →
  /// rounding against the embedding table. Deterministic for a seed (whatever the thread count).
  generation_result generate(context<cpu> const& ctx, generation_request const& req) {
    auto const& s = cfg_.sizes;
    auto const start = std::chrono::steady_clock::now();
    float const* E = p("embed.weight");
    float const* m = p("absorbing");
    detail::generation_layout const lay(req, s.vocab, E, s.embed_dim);
    int const P = lay.prompt, N = lay.tokens, de = s.embed_dim;
    std::size_t const n = std::size_t(N) * de;
    anchor::token_shape const shape{1, N, de};
    auto const& target = lay.target;
    auto const& clean = lay.clean;
    std::vector<float> x(n), ws(3 * n), scratch(n);
    solver::gaussian_noise const noise{req.seed};
    for (std::size_t i = 0; i < n; ++i) x[i] = target[i / de] ? float(noise(0, i)) + m[i % de] : clean[i];

    generation_result res;
    auto const ops = solver::ops(cfg_.schedule);
    auto const grid = solver::make_grid(ops, cfg_.steps, cfg_.spacing, cfg_.t_start, cfg_.t_end);
    auto den = [&](float const* xs, double t, float* out) {
      forward(ctx, xs, t, out, 1, N, &res.timing);
      ++res.evaluations;
    };
    anchor::keep_clean<cpu, float> keep(ctx, shape, target.data(), clean.data());
    anchor::nearest_embedding<float> const table{E, s.vocab, de, cfg_.rounding};
    auto guide = anchor::make_guidance(ctx, shape, anchor::bind<float>(ctx, table, shape), cfg_.guidance_schedule,
                                       ops, scratch.data());
    auto x0_hook = [&](float* x0, double t, int step) {
      if (cfg_.guidance) guide(x0, t, step);
      keep(x0, t, step);
    };
    auto xt_hook = [&](float* xs, double t, int step) {
      keep(xs, t, step);
      if (req.progress) req.progress(step + 1, cfg_.steps);
    };
    double const before = res.timing.total();
    auto const t_solve = std::chrono::steady_clock::now();
    solver::dpmpp_sample(ctx, ops, cfg_.solver, grid, den, x.data(), n, ws.data(), x0_hook, xt_hook);
    double const solve = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_solve).count();
    res.timing.solver += std::max(0.0, solve - (res.timing.total() - before));  // updates and hooks
    auto const t_round = std::chrono::steady_clock::now();
    std::vector<int> ids(static_cast<std::size_t>(N));
    anchor::round_to_nearest(ctx, table, shape, x.data(), ids.data());
    res.timing.rounding += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_round).count();
    res.tokens.assign(ids.begin() + P, ids.end());
    res.steps = cfg_.steps;
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return res;
  }

 private:
  Config cfg_;
  model_weights w_;
  std::vector<float> h_, ln_, qkv_, att_, ffn_, temb_, tfeat_, thid_, rope_cos_, rope_sin_, cat_ws_;
  std::vector<unsigned char> attn_ws_;
  int rope_seq_ = 0;

  float const* p(std::string const& name) const { return w_.tensor(name).data(); }

  void reserve(std::int64_t T, int seq) {
    auto const& s = cfg_.sizes;
    std::size_t const dm = std::size_t(s.d_model);
    h_.resize(std::size_t(T) * dm);
    ln_.resize(h_.size());
    att_.resize(h_.size());
    ffn_.resize(h_.size());
    qkv_.resize(3 * h_.size());
    if (rope_seq_ != seq) {  // cos/sin of p·base^(−2i/hd) for every position and pair
      int const half = s.head_dim() / 2;
      rope_cos_.resize(std::size_t(seq) * half);
      rope_sin_.resize(rope_cos_.size());
      for (int pos = 0; pos < seq; ++pos)
        for (int i = 0; i < half; ++i) {
          double const a = pos * std::pow(cfg_.rope_base, -2.0 * i / s.head_dim());
          rope_cos_[std::size_t(pos) * half + i] = float(std::cos(a));
          rope_sin_[std::size_t(pos) * half + i] = float(std::sin(a));
        }
      rope_seq_ = seq;
    }
  }

  /// Rotates the (2i, 2i+1) pairs of every head of q and k by position.
  void rope(context<cpu> const& ctx, std::int64_t T, int seq) {
    auto const& s = cfg_.sizes;
    int const dm = s.d_model, hd = s.head_dim(), half = hd / 2;
    std::int64_t const chunk = 256;
    detail::parallel_for(detail::resolve_threads(ctx.num_threads), (T + chunk - 1) / chunk, [&](std::int64_t c, int) {
      for (std::int64_t r = c * chunk; r < std::min(T, (c + 1) * chunk); ++r) {
        int const pos = int(r % seq);
        float const* cs = rope_cos_.data() + std::size_t(pos) * half;
        float const* sn = rope_sin_.data() + std::size_t(pos) * half;
        for (int part = 0; part < 2; ++part)
          for (int h = 0; h < s.heads; ++h) {
            float* v = qkv_.data() + std::size_t(r) * 3 * dm + std::size_t(part) * dm + std::size_t(h) * hd;
            for (int i = 0; i < half; ++i) {
              float const a = v[2 * i], b = v[2 * i + 1];
              v[2 * i] = a * cs[i] - b * sn[i];
              v[2 * i + 1] = a * sn[i] + b * cs[i];
            }
          }
      }
    });
  }

  /// temb = fc2(SiLU(fc1(sinusoidal(1000·t)))), one vector for every token of the call.
  void time_embedding(context<cpu> const& ctx, double t) {
    auto const& s = cfg_.sizes;
    int const td = s.time_dim, half = td / 2, dm = s.d_model;
    tfeat_.resize(std::size_t(td));
    for (int i = 0; i < half; ++i) {
      double const f = std::exp(-std::log(10000.0) * i / half) * 1000.0 * t;
      tfeat_[std::size_t(i)] = float(std::cos(f));
      tfeat_[std::size_t(half + i)] = float(std::sin(f));
    }
    thid_.resize(std::size_t(dm));
    temb_.resize(std::size_t(dm));
    detail::linear_rows(ctx, tfeat_.data(), 1, td, p("time.fc1.weight"), dm, p("time.fc1.bias"), thid_.data(), false);
    for (auto& v : thid_) v = v / (1.f + std::exp(-v));
    detail::linear_rows(ctx, thid_.data(), 1, dm, p("time.fc2.weight"), dm, p("time.fc2.bias"), temb_.data(), false);
  }
};

DRDIFF_NAMESPACE_END
