#pragma once
/// \file
/// The DrDiff model on the CPU: the layer operations of model<cpu, Config> (the network itself is
/// written once, in model/model.hpp). fp32 weights and activations, linear layers through Eigen,
/// attention through drdiff::attention (any policy), the routed MoE through router::moe_forward,
/// sampling with solver::dpmpp_sample, and rounding by anchor::round_to_nearest against the tied
/// embedding table.

#include <drdiff/anchor/guidance.hpp>
#include <drdiff/attention/args.hpp>
#include <drdiff/attention/attention.hpp>
#include <drdiff/cpu/anchor.hpp>
#include <drdiff/cpu/attention.hpp>
#include <drdiff/cpu/detail/linear.hpp>
#include <drdiff/cpu/distributed.hpp>
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

/// The CPU's layer operations for model<cpu, Config>: they work on their own activation buffers
/// (the residual stream h, ln, qkv, att, the FFN output) and read the weights from the model's host
/// copy. Copyable (a copied model gets its own buffers).
template <>
class model_layers<cpu> {
 public:
  static constexpr bool cheap_timing = true;  ///< timing is a clock read: generation always splits it

  explicit model_layers(network_spec const& spec) : spec_(spec) {}

  void bind(model_weights const& w, bool /*changed*/) { w_ = &w; }
  float const* weight(std::string const& name) const { return w_->tensor(name).data(); }

  /// `pos0`: the position of the first row (a rank's chunk of a longer sequence starts past 0).
  template <class Policy, class Router>
  void prepare(context<cpu> const& /*ctx*/, Policy const& /*policy*/, Router const& /*router*/, int batch, int seq,
               int pos0 = 0) {
    auto const& s = spec_.sizes;
    batch_ = batch;
    seq_ = seq;
    tokens_ = std::int64_t(batch) * seq;
    std::size_t const dm = std::size_t(s.d_model);
    h_.resize(std::size_t(tokens_) * dm);
    ln_.resize(h_.size());
    att_.resize(h_.size());
    ffn_.resize(h_.size());
    qkv_.resize(3 * h_.size());
    if (rope_seq_ != seq || rope_pos0_ != pos0) {  // cos/sin of p·base^(−2i/hd) for every position and pair
      int const half = s.head_dim() / 2;
      rope_cos_.resize(std::size_t(seq) * half);
      rope_sin_.resize(rope_cos_.size());
      for (int pos = 0; pos < seq; ++pos)
        for (int i = 0; i < half; ++i) {
          double const a = double(pos0 + pos) * std::pow(spec_.rope_base, -2.0 * i / s.head_dim());
          rope_cos_[std::size_t(pos) * half + i] = float(std::cos(a));
          rope_sin_[std::size_t(pos) * half + i] = float(std::sin(a));
        }
      rope_seq_ = seq;
      rope_pos0_ = pos0;
    }
  }

  /// Wall-clock time per component on the steady clock.
  class timer {
   public:
    explicit timer(model_timing* t) : t_(t) {}
    void begin() {
      if (t_) t0_ = std::chrono::steady_clock::now();
    }
    void end(double model_timing::*field) {
      if (t_) t_->*field += seconds_since(t0_);
    }
    void finish() {}

   private:
    model_timing* t_;
    std::chrono::steady_clock::time_point t0_{};
  };
  timer clock(context<cpu> const& /*ctx*/, model_timing* t) const { return timer(t); }

  /// temb = fc2(SiLU(fc1(sinusoidal(1000·t)))), one vector for every token of the call.
  void time_embedding(context<cpu> const& ctx, double t, std::string const& fc1, std::string const& fc2) {
    auto const& s = spec_.sizes;
    int const td = s.time_dim, half = td / 2, dm = s.d_model;
    tfeat_.resize(std::size_t(td));
    for (int i = 0; i < half; ++i) {
      double const f = std::exp(-std::log(10000.0) * i / half) * 1000.0 * t;
      tfeat_[std::size_t(i)] = float(std::cos(f));
      tfeat_[std::size_t(half + i)] = float(std::sin(f));
    }
    thid_.resize(std::size_t(dm));
    temb_.resize(std::size_t(dm));
    linear_rows(ctx, tfeat_.data(), 1, td, weight(fc1 + ".weight"), dm, weight(fc1 + ".bias"), thid_.data(), false);
    for (auto& v : thid_) v = v / (1.f + std::exp(-v));
    linear_rows(ctx, thid_.data(), 1, dm, weight(fc2 + ".weight"), dm, weight(fc2 + ".bias"), temb_.data(), false);
  }
  /// h = x_t·Wᵀ + b + temb; with a previous estimate (self-conditioning) also + x̂0_prev·W_scᵀ.
  void input(context<cpu> const& ctx, float const* xt, std::string const& up, float const* maybe_prev,
             std::string const& up_sc) {
    int const dm = spec_.sizes.d_model, de = spec_.sizes.embed_dim;
    linear_rows(ctx, xt, tokens_, de, weight(up + ".weight"), dm, weight(up + ".bias"), h_.data(), false);
    if (maybe_prev) linear_rows(ctx, maybe_prev, tokens_, de, weight(up_sc + ".weight"), dm, nullptr, h_.data(), true);
    for (std::int64_t r = 0; r < tokens_; ++r)
      for (int k = 0; k < dm; ++k) h_[std::size_t(r) * dm + k] += temb_[std::size_t(k)];
  }
  /// ln = LayerNorm(h) with `name`.weight and `name`.bias.
  void norm(context<cpu> const& ctx, std::string const& name) {
    layer_norm_rows(ctx, h_.data(), tokens_, spec_.sizes.d_model, weight(name + ".weight"), weight(name + ".bias"),
                    spec_.norm_eps, ln_.data());
  }
  /// qkv = ln·Wᵀ, then RoPE on q and k.
  void qkv(context<cpu> const& ctx, std::string const& w) {
    int const dm = spec_.sizes.d_model;
    linear_rows(ctx, ln_.data(), tokens_, dm, weight(w), 3 * dm, nullptr, qkv_.data(), false);
    rope(ctx);
  }
  /// The attention call over the rows held: q, k, v in place in the qkv buffer, o into att.
  attention_args<float> attn_args() {
    auto const& s = spec_.sizes;
    int const dm = s.d_model, hd = s.head_dim();
    attention_args<float> a{};
    a.batch = batch_; a.seq = seq_; a.heads = s.heads; a.head_dim = hd;
    tensor_strides const st{std::int64_t(seq_) * 3 * dm, 3 * dm, hd};
    a.q = qkv_.data(); a.k = qkv_.data() + dm; a.v = qkv_.data() + 2 * dm;
    a.q_strides = a.k_strides = a.v_strides = st;
    a.o = att_.data();
    a.o_strides = packed_strides(seq_, s.heads, hd);
    return a;
  }
  template <class Policy>
  void attention(context<cpu> const& ctx, Policy const& policy) {
    attention_args<float> const a = attn_args();
    std::size_t const need = attention_workspace_bytes(ctx, policy, a);
    if (attn_ws_.size() < need) attn_ws_.resize(need);
    drdiff::attention(ctx, policy, a, attn_ws_.data(), attn_ws_.size());
  }
  /// The rows held are this rank's chunk of a sequence of `seq` tokens split over the ranks of `d`.
  template <class Comm, class Policy>
  void attention(distributed_context<cpu, Comm> const& d, Policy const& policy, int seq) {
    distributed_attention_args<float> args;
    args.seq = seq;
    args.chunk = attn_args();
    std::size_t const need = distributed_attention_workspace_bytes(d, policy, args);
    if (attn_ws_.size() < need) attn_ws_.resize(need);
    distributed_attention(d, policy, args, attn_ws_.data(), attn_ws_.size());
  }
  /// h += att·Wᵀ.
  void project_add(context<cpu> const& ctx, std::string const& w) {
    int const dm = spec_.sizes.d_model;
    linear_rows(ctx, att_.data(), tokens_, dm, weight(w), dm, nullptr, h_.data(), true);
  }
  /// h += MoE(ln) with the experts of block `pre`.
  template <class Router>
  void ffn(context<cpu> const& ctx, Router const& router, std::string const& pre, double t) {
    router::moe_args<float> m;
    auto const tensor = [&](std::string const& n) { return weight(n); };
    bind_moe_weights(m, pre, spec_.sizes, spec_.activation, tensor, tensor);
    m.tokens = int(tokens_);
    m.x = ln_.data(); m.out = ffn_.data();
    m.act = spec_.activation == ffn_activation::swiglu ? router::activation::swiglu : router::activation::gelu;
    m.timestep = float(t);
    router::moe_forward(ctx, router, m);
    for (std::int64_t i = 0; i < tokens_ * spec_.sizes.d_model; ++i) h_[std::size_t(i)] += ffn_[std::size_t(i)];
  }
  /// x0 = ln·Wᵀ + b; with the categorical prediction softmax(x0·Eᵀ)·E.
  void output(context<cpu> const& ctx, float* x0, std::string const& down, std::string const& table) {
    auto const& s = spec_.sizes;
    linear_rows(ctx, ln_.data(), tokens_, s.d_model, weight(down + ".weight"), s.embed_dim, weight(down + ".bias"), x0,
                false);
    if (spec_.output == prediction::categorical) {
      std::size_t const need = std::size_t(resolve_threads(ctx.num_threads)) * categorical_chunk * s.vocab;
      if (cat_ws_.size() < need) cat_ws_.resize(need);
      categorical_rows(ctx, x0, tokens_, s.embed_dim, weight(table), s.vocab, cat_ws_.data());
    }
  }

  // ---- generation ----------------------------------------------------------------------------

  struct generation {
    float *x, *workspace, *guide_scratch, *prev;  ///< prev: the last estimate (self-conditioned models)
    unsigned char const* target;
    float const* clean;
  };
  /// The sampler's state: target tokens get N(0, 1) noise (counter-based) plus m, prompt tokens
  /// their clean embedding; the solver's workspace and the guidance scratch.
  generation begin_generation(context<cpu> const& /*ctx*/, generation_layout const& lay, std::uint64_t seed,
                              std::string const& absorbing) {
    int const de = spec_.sizes.embed_dim;
    std::size_t const n = std::size_t(lay.tokens) * de;
    gen_x_.resize(n);
    gen_ws_.resize(3 * n);
    gen_scratch_.resize(n);
    gen_prev_.resize(spec_.sizes.self_condition ? n : 0);
    float const* m = weight(absorbing);
    solver::gaussian_noise const noise{seed};
    for (std::size_t i = 0; i < n; ++i)
      gen_x_[i] = lay.target[i / de] ? float(noise(0, i)) + m[i % de] : lay.clean[i];
    return {gen_x_.data(), gen_ws_.data(), gen_scratch_.data(), gen_prev_.data(), lay.target.data(), lay.clean.data()};
  }
  /// dst = src, n floats (the self-conditioned estimate kept for the next step).
  void copy(context<cpu> const& /*ctx*/, float const* src, float* dst, std::size_t n) const { std::copy(src, src + n, dst); }
  auto projector(context<cpu> const& ctx, anchor::nearest_embedding<float> const& table,
                 anchor::token_shape const& shape) const {
    return anchor::bind<float>(ctx, table, shape);
  }
  template <class Ops, class Grid, class Den, class H0, class Ht>
  void sample(context<cpu> const& ctx, Ops const& ops, solver::dpmpp_config const& cfg, Grid const& grid, Den&& den,
              float* x, std::size_t n, float* ws, H0&& x0_hook, Ht&& xt_hook) {
    solver::dpmpp_sample(ctx, ops, cfg, grid, den, x, n, ws, x0_hook, xt_hook);
  }
  std::vector<int> round(context<cpu> const& ctx, anchor::nearest_embedding<float> const& table,
                         anchor::token_shape const& shape, float const* x) const {
    std::vector<int> ids(static_cast<std::size_t>(shape.batch) * shape.seq);
    anchor::round_to_nearest(ctx, table, shape, x, ids.data());
    return ids;
  }
  void synchronize(context<cpu> const& /*ctx*/) const {}

 private:
  network_spec spec_;
  model_weights const* w_ = nullptr;
  std::int64_t tokens_ = 0;
  int batch_ = 0, seq_ = 0, rope_seq_ = 0, rope_pos0_ = 0;
  std::vector<float> h_, ln_, qkv_, att_, ffn_, temb_, tfeat_, thid_, rope_cos_, rope_sin_, cat_ws_;
  std::vector<float> gen_x_, gen_ws_, gen_scratch_, gen_prev_;
  std::vector<unsigned char> attn_ws_;

  /// Rotates the (2i, 2i+1) pairs of every head of q and k by position.
  void rope(context<cpu> const& ctx) {
    auto const& s = spec_.sizes;
    int const dm = s.d_model, hd = s.head_dim(), half = hd / 2, seq = seq_;
    std::int64_t const T = tokens_, chunk = 256;
    parallel_for(resolve_threads(ctx.num_threads), (T + chunk - 1) / chunk, [&](std::int64_t c, int) {
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
};

}  // namespace detail

DRDIFF_NAMESPACE_END
