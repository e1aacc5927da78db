#pragma once
/// \file
/// The DrDiff model on the GPU: the layer operations of model<cuda, Config> (the network itself is
/// written once, in model/model.hpp). bf16 weights and activations with fp32 accumulation, an fp32
/// residual stream, linear layers through cuBLAS (bf16 inputs, fp32 or bf16 outputs), attention
/// through drdiff::attention (tensor cores, any policy), the routed MoE through router::moe_forward
/// (a model with one expert runs its FFN as two plain GEMMs), the solver state in fp32 on the device
/// (solver::dpmpp_sample for context<cuda>), anchor hooks and rounding on the device. Device memory
/// is owned by Thrust vectors; the kernels are in cuda/kernels/model.cuh. Include from a .cu file and
/// link CUDA::cublas.

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/attention.hpp>
#include <drdiff/cuda/anchor.cuh>
#include <drdiff/cuda/attention.cuh>
#include <drdiff/cuda/detail/blas.cuh>
#include <drdiff/cuda/distributed.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/kernels/model.cuh>
#include <drdiff/cuda/memory.cuh>
#include <drdiff/cuda/moe.cuh>
#include <drdiff/cuda/solver.cuh>
#include <drdiff/model/model.hpp>
#include <drdiff/model/weights.hpp>
#include <drdiff/solver/grid.hpp>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/system/cuda/execution_policy.h>
#include <thrust/transform.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// LayerNorm launch: the register-resident form where d allows it.
inline void model_norm(float const* x, int d, float const* g, float const* b, float eps, bf16* y, std::int64_t rows,
                       cudaStream_t st) {
  unsigned const grid = unsigned(rows);
  if (d % 4 == 0 && d <= 512) model_layer_norm_vec<1><<<grid, 128, 0, st>>>(x, d, g, b, eps, y);
  else if (d % 4 == 0 && d <= 1024) model_layer_norm_vec<2><<<grid, 128, 0, st>>>(x, d, g, b, eps, y);
  else if (d % 4 == 0 && d <= 2048) model_layer_norm_vec<4><<<grid, 128, 0, st>>>(x, d, g, b, eps, y);
  else if (d % 4 == 0 && d <= 4096) model_layer_norm_vec<8><<<grid, 128, 0, st>>>(x, d, g, b, eps, y);
  else model_layer_norm<<<grid, 128, 0, st>>>(x, d, g, b, eps, y);
}

/// x̂0 ← softmax(x̂0·Eᵀ)·E for `rows` tokens (fp32; E [vocab × d] fp32 on the device), in chunks
/// of `chunk` rows through the scratch L [chunk × vocab].
inline void model_categorical(cublasHandle_t h, float* x0, std::int64_t rows, int d, float const* E, int vocab,
                              float* L, std::int64_t chunk, cudaStream_t st) {
  float const one = 1.f, zero = 0.f;
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk) {
    int const n = int(std::min(chunk, rows - r0));
    float* x = x0 + r0 * d;
    // Row-major L[n × V] = X[n × d]·Eᵀ: column-major Lᵀ = E·Xᵀ.
    cublas_check(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, vocab, n, d, &one, E, d, x, d, &zero, L, vocab),
                 "cublasSgemm (logits)");
    model_softmax_rows<256><<<unsigned(n), 256, 0, st>>>(L, vocab);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    // Row-major X[n × d] = P[n × V]·E[V × d]: column-major Xᵀ = Eᵀ·Pᵀ.
    cublas_check(cublasSgemm(h, CUBLAS_OP_N, CUBLAS_OP_N, d, n, vocab, &one, E, d, L, vocab, &zero, x, d),
                 "cublasSgemm (expectation)");
  }
}

/// C (M×N, fp32 or bf16) = A (M×K, bf16) · B (N×K, bf16)ᵀ, plus beta·C (beta 0 or 1).
template <class TC>
void gemm_bf16(cublasHandle_t h, int m, int n, int k, bf16 const* a, bf16 const* b, TC* c, float beta) {
  if (m == 0) return;
  float const one = 1.f;
  cublas_check(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, n, m, k, &one, b, CUDA_R_16BF, k, a, CUDA_R_16BF, k, &beta, c,
                            std::is_same_v<TC, float> ? CUDA_R_32F : CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                            CUBLAS_GEMM_DEFAULT),
               "cublasGemmEx");
}


/// A device buffer of n elements (at least one), its old contents dropped (a resize would copy
/// them). A new buffer is zero-filled by Thrust (a fill and a synchronisation, once per shape).
template <class T>
void fresh(device_vector<T>& v, std::size_t n) {
  n = std::max<std::size_t>(n, 1);
  if (v.size() == n) return;
  device_vector<T>().swap(v);
  v.resize(n);
}
template <class T>
T* raw(device_vector<T>& v) { return thrust::raw_pointer_cast(v.data()); }
template <class T>
T const* raw(device_vector<T> const& v) { return thrust::raw_pointer_cast(v.data()); }

/// The GPU's layer operations for model<cuda, Config>: device copies of the weights (matrices in
/// bf16; vectors, norms and the embedding table in fp32), the activation buffers, the workspaces of
/// attention and the MoE, and a cuBLAS handle of its own (used when the call's context carries
/// none; set to the call's stream). Not copyable. Everything
/// lives on the device current at construction; the buffers are shared by the model's calls, so
/// they run one at a time (on any stream, but not concurrently on two).
template <>
class model_layers<cuda> {
 public:
  static constexpr bool cheap_timing = false;  ///< events around each component synchronise: on request only

  explicit model_layers(network_spec const& spec) : spec_(spec) {
    DRDIFF_CUDA_CHECK(cudaGetDevice(&device_));
    cublas_check(cublasCreate(&blas_), "cublasCreate");
  }
  model_layers(model_layers const&) = delete;
  model_layers& operator=(model_layers const&) = delete;
  ~model_layers() {
    if (blas_) cublasDestroy(blas_);
  }

  /// Uploads the weights when they changed (matrices as bf16).
  void bind(model_weights const& w, bool changed) {
    if (!changed && !mats_.empty()) return;
    mats_.clear();
    vecs_.clear();
    for (auto const& s : w.specs()) {
      auto const& v = w.tensor(s.name);
      bool const matrix = s.shape.size() >= 2 && s.name != "embed.weight";
      if (matrix) {
        std::vector<bf16> h(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) h[i] = __float2bfloat16(v[i]);
        mats_[s.name] = device_vector<bf16>(h.begin(), h.end());
      } else {
        vecs_[s.name] = device_vector<float>(v.begin(), v.end());
      }
    }
  }
  float const* weight(std::string const& name) const { return raw(vecs_.at(name)); }

  /// `pos0`: the position of the first row (a rank's chunk of a longer sequence starts past 0).
  template <class Policy, class Router>
  void prepare(context<cuda> const& ctx, Policy const& policy, Router const& router, int batch, int seq, int pos0 = 0) {
    DRDIFF_CHECK(ctx.device < 0 || ctx.device == device_, "model (cuda): context<cuda>::device = ", ctx.device,
                 " but the model lives on device ", device_, " (the device current when it was built)");
    cublas_check(cublasSetStream(blas(ctx), stream(ctx)), "cublasSetStream");
    std::int64_t const T = std::int64_t(batch) * seq;
    auto const& s = spec_.sizes;
    DRDIFF_CHECK(T * 3 * s.d_model < (std::int64_t(1) << 31) * 8, "model (cuda): ", T, " tokens are too many");
    if (T != tokens_ || seq != seq_ || batch != batch_ || pos0 != pos0_) {
      std::size_t const dm = std::size_t(s.d_model);
      fresh(h_, std::size_t(T) * dm);
      fresh(temb_, dm);
      fresh(thid_, dm);
      fresh(tfeat_, std::size_t(s.time_dim));
      fresh(xb_, std::size_t(T) * s.embed_dim);
      fresh(ln_, std::size_t(T) * dm);
      fresh(qkv_, std::size_t(T) * 3 * dm);
      fresh(att_, std::size_t(T) * dm);
      if (s.experts == 1) fresh(ffh_, std::size_t(T) * s.d_ff);
      std::size_t const rope_n = std::size_t(seq) * (s.head_dim() / 2);
      fresh(rope_cos_, rope_n);
      fresh(rope_sin_, rope_n);
      model_rope_table<<<model_grid(rope_n), 256, 0, stream(ctx)>>>(raw(rope_cos_), raw(rope_sin_), seq, s.head_dim() / 2,
                                                                 spec_.rope_base, pos0);
      DRDIFF_CUDA_CHECK(cudaGetLastError());
      tokens_ = T;
      seq_ = seq;
      batch_ = batch;
      pos0_ = pos0;
      try {  // the workspaces for this shape (a model type has one policy and one router)
        fresh(attn_ws_, attention_workspace_bytes(ctx, policy, attn_args()));
        fresh(moe_ws_, router::moe_workspace_bytes(with_blas(ctx), router, moe_args("blocks.0.", 0.0)));
      } catch (...) {  // not prepared: the next call tries again
        tokens_ = 0;
        seq_ = batch_ = 0;
        throw;
      }
    }
  }

  /// CUDA events around components; the elapsed times are added at finish() (one synchronisation).
  class timer {
   public:
    timer(model_timing* t, cudaStream_t s) : t_(t), s_(s) {}
    timer(timer const&) = delete;
    timer& operator=(timer const&) = delete;
    timer(timer&& o) noexcept : t_(o.t_), s_(o.s_), marks_(std::move(o.marks_)) { o.marks_.clear(); }
    ~timer() {
      for (auto& e : marks_) {
        cudaEventDestroy(e.a);
        cudaEventDestroy(e.b);
      }
    }
    void begin() {
      if (!t_) return;
      mark m{};
      DRDIFF_CUDA_CHECK(cudaEventCreate(&m.a));
      DRDIFF_CUDA_CHECK(cudaEventCreate(&m.b));
      DRDIFF_CUDA_CHECK(cudaEventRecord(m.a, s_));
      marks_.push_back(m);
    }
    void end(double model_timing::*field) {
      if (!t_) return;
      marks_.back().field = field;
      DRDIFF_CUDA_CHECK(cudaEventRecord(marks_.back().b, s_));
    }
    void finish() {
      if (!t_) return;
      DRDIFF_CUDA_CHECK(cudaStreamSynchronize(s_));
      for (auto const& e : marks_) {
        float ms = 0;
        DRDIFF_CUDA_CHECK(cudaEventElapsedTime(&ms, e.a, e.b));
        t_->*e.field += ms * 1e-3;
      }
    }

   private:
    struct mark {
      cudaEvent_t a, b;
      double model_timing::*field;
    };
    model_timing* t_;
    cudaStream_t s_;
    std::vector<mark> marks_;
  };
  timer clock(context<cuda> const& ctx, model_timing* t) const { return timer(t, stream(ctx)); }

  /// temb = fc2(SiLU(fc1(sinusoidal(1000·t)))): the features on the host, the MLP on the device.
  void time_embedding(context<cuda> const& ctx, double t, std::string const& fc1, std::string const& fc2) {
    auto const& s = spec_.sizes;
    int const td = s.time_dim, half = td / 2, dm = s.d_model;
    std::vector<float> f(static_cast<std::size_t>(td));
    for (int i = 0; i < half; ++i) {
      double const a = std::exp(-std::log(10000.0) * i / half) * 1000.0 * t;
      f[std::size_t(i)] = float(std::cos(a));
      f[std::size_t(half + i)] = float(std::sin(a));
    }
    auto const st = stream(ctx);
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(raw(tfeat_), f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice, st));
    model_matvec<<<(dm * 32 + 255) / 256, 256, 0, st>>>(mat(fc1 + ".weight"), raw(tfeat_), weight(fc1 + ".bias"), dm,
                                                        td, true, raw(thid_));
    model_matvec<<<(dm * 32 + 255) / 256, 256, 0, st>>>(mat(fc2 + ".weight"), raw(thid_), weight(fc2 + ".bias"), dm,
                                                        dm, false, raw(temb_));
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
  /// h = bf16(x_t)·Wᵀ + b + temb (fp32); self-conditioned: + bf16(x̂0_prev)·W_scᵀ.
  void input(context<cuda> const& ctx, float const* xt, std::string const& up, float const* maybe_prev,
             std::string const& up_sc) {
    auto const& s = spec_.sizes;
    std::size_t const n = std::size_t(tokens_) * s.embed_dim;
    auto const on = thrust::cuda::par_nosync.on(stream(ctx));
    thrust::transform(on, xt, xt + n, raw(xb_), model_to_bf16_op{});
    gemm_bf16(blas(ctx), int(tokens_), s.d_model, s.embed_dim, raw(xb_), mat(up + ".weight"), raw(h_), 0.f);
    if (maybe_prev) {  // self-conditioning: h += bf16(x̂0_prev)·W_scᵀ (xb_ is free again in stream order)
      thrust::transform(on, maybe_prev, maybe_prev + n, raw(xb_), model_to_bf16_op{});
      gemm_bf16(blas(ctx), int(tokens_), s.d_model, s.embed_dim, raw(xb_), mat(up_sc + ".weight"), raw(h_), 1.f);
    }
    add_rows(ctx, raw(h_), weight(up + ".bias"), raw(temb_), s.d_model);
  }
  void norm(context<cuda> const& ctx, std::string const& name) {
    model_norm(raw(h_), spec_.sizes.d_model, weight(name + ".weight"), weight(name + ".bias"), spec_.norm_eps, raw(ln_),
               tokens_, stream(ctx));
  }
  /// qkv = ln·Wᵀ (bf16), then RoPE on q and k.
  void qkv(context<cuda> const& ctx, std::string const& w) {
    auto const& s = spec_.sizes;
    int const dm = s.d_model;
    gemm_bf16(blas(ctx), int(tokens_), 3 * dm, dm, raw(ln_), mat(w), raw(qkv_), 0.f);
    model_rope<<<model_grid(std::size_t(tokens_) * dm / 4), 256, 0, stream(ctx)>>>(raw(qkv_), raw(rope_cos_),
                                                                                 raw(rope_sin_), tokens_, seq_, dm,
                                                                                 s.head_dim());
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
  template <class Policy>
  void attention(context<cuda> const& ctx, Policy const& policy) {
    drdiff::attention(ctx, policy, attn_args(), raw(attn_ws_), attn_ws_.size());
  }
  /// The rows held are this rank's chunk of a sequence of `seq` tokens split over the ranks of `d`.
  template <class Comm, class Policy>
  void attention(distributed_context<cuda, Comm> const& d, Policy const& policy, int seq) {
    distributed_attention_args<bf16> args;
    args.seq = seq;
    args.chunk = attn_args();
    std::size_t const need = distributed_attention_workspace_bytes(d, policy, args);
    fresh_at_least(dist_ws_, need);
    distributed_attention(d, policy, args, raw(dist_ws_), dist_ws_.size());
  }
  /// h += att·Wᵀ (into the fp32 residual stream).
  void project_add(context<cuda> const& ctx, std::string const& w) {
    int const dm = spec_.sizes.d_model;
    gemm_bf16(blas(ctx), int(tokens_), dm, dm, raw(att_), mat(w), raw(h_), 1.f);
  }
  /// h += MoE(ln): the routed MoE adds its output to h in its combine; one GELU expert and no shared
  /// one is a dense FFN of two GEMMs.
  template <class Router>
  void ffn(context<cuda> const& ctx, Router const& router, std::string const& pre, double t) {
    auto const& s = spec_.sizes;
    if (s.experts == 1 && s.shared_experts == 0 && spec_.activation == ffn_activation::gelu) {
      gemm_bf16(blas(ctx), int(tokens_), s.d_ff, s.d_model, raw(ln_), mat(pre + "moe.experts.up"), raw(ffh_), 0.f);
      moe_activate(raw(ffh_), static_cast<bf16 const*>(nullptr), std::size_t(tokens_) * s.d_ff, false, stream(ctx));
      gemm_bf16(blas(ctx), int(tokens_), s.d_model, s.d_ff, raw(ffh_), mat(pre + "moe.experts.down"), raw(h_), 1.f);
    } else {
      router::moe_forward(with_blas(ctx), router, moe_args(pre, t), raw(moe_ws_), moe_ws_.size());
    }
  }
  /// x0 = ln·Wᵀ + b (fp32); with the categorical prediction softmax(x0·Eᵀ)·E.
  void output(context<cuda> const& ctx, float* x0, std::string const& down, std::string const& table) {
    auto const& s = spec_.sizes;
    gemm_bf16(blas(ctx), int(tokens_), s.embed_dim, s.d_model, raw(ln_), mat(down + ".weight"), x0, 0.f);
    add_rows(ctx, x0, weight(down + ".bias"), nullptr, s.embed_dim);
    if (spec_.output == prediction::categorical) {
      std::int64_t const chunk = std::min<std::int64_t>(tokens_, 4096);
      auto* L = static_cast<float*>(scratch("categorical", std::size_t(chunk) * s.vocab * sizeof(float)));
      model_categorical(blas(ctx), x0, tokens_, s.embed_dim, weight(table), s.vocab, L, chunk, stream(ctx));
    }
  }

  // ---- generation ----------------------------------------------------------------------------

  struct generation {
    float *x, *workspace, *guide_scratch, *prev;  ///< prev: the last estimate (self-conditioned models)
    unsigned char const* target;
    float const* clean;
  };
  /// The sampler's state on the device: the same counter-based noise as on the CPU.
  generation begin_generation(context<cuda> const& ctx, generation_layout const& lay, std::uint64_t seed,
                              std::string const& absorbing) {
    int const de = spec_.sizes.embed_dim;
    std::size_t const n = std::size_t(lay.tokens) * de;
    auto const st = stream(ctx);
    auto* target = static_cast<unsigned char*>(scratch("gen.target", lay.target.size()));
    auto* clean = static_cast<float*>(scratch("gen.clean", n * sizeof(float)));
    auto* x = static_cast<float*>(scratch("gen.x", n * sizeof(float)));
    auto* ws = static_cast<float*>(scratch("gen.ws", solver::sample_workspace_size<float>(n) * sizeof(float)));
    auto* guide = static_cast<float*>(scratch("gen.guide", n * sizeof(float)));
    auto* prev = spec_.sizes.self_condition ? static_cast<float*>(scratch("gen.prev", n * sizeof(float))) : nullptr;
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(target, lay.target.data(), lay.target.size(), cudaMemcpyHostToDevice, st));
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(clean, lay.clean.data(), n * sizeof(float), cudaMemcpyHostToDevice, st));
    thrust::transform(thrust::cuda::par_nosync.on(st), thrust::counting_iterator<std::size_t>(0),
                      thrust::counting_iterator<std::size_t>(n), x,
                      model_initial_state_op{clean, target, weight(absorbing), solver::gaussian_noise{seed}, de});
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    return {x, ws, guide, prev, target, clean};
  }
  /// dst = src, n floats on the device, in stream order (the self-conditioned estimate for the next step).
  void copy(context<cuda> const& ctx, float const* src, float* dst, std::size_t n) const {
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * sizeof(float), cudaMemcpyDeviceToDevice, stream(ctx)));
  }
  auto projector(context<cuda> const& ctx, anchor::nearest_embedding<float> const& table,
                 anchor::token_shape const& shape) {
    std::size_t const bytes = anchor::projector_workspace_bytes(ctx, table, shape);
    return anchor::bind<float>(with_blas(ctx), table, shape, scratch("gen.proj", bytes), bytes);
  }
  template <class Ops, class Grid, class Den, class H0, class Ht>
  void sample(context<cuda> const& ctx, Ops const& ops, solver::dpmpp_config const& cfg, Grid const& grid, Den&& den,
              float* x, std::size_t n, float* ws, H0&& x0_hook, Ht&& xt_hook) {
    solver::dpmpp_sample(ctx, ops, cfg, grid, den, x, n, ws, x0_hook, xt_hook);
  }
  /// Rounds on the device; the ids come back to the host (synchronises).
  std::vector<int> round(context<cuda> const& ctx, anchor::nearest_embedding<float> const& table,
                         anchor::token_shape const& shape, float const* x) {
    std::size_t const count = std::size_t(shape.batch) * shape.seq;
    auto* ids = static_cast<int*>(scratch("gen.ids", count * sizeof(int)));
    std::size_t const bytes = anchor::workspace_bytes(ctx, table, shape);
    anchor::round_to_nearest(with_blas(ctx), table, shape, x, ids, static_cast<float*>(nullptr),
                             scratch("gen.round", bytes), bytes);  // synchronises
    std::vector<int> out(count);
    DRDIFF_CUDA_CHECK(cudaMemcpy(out.data(), ids, count * sizeof(int), cudaMemcpyDeviceToHost));
    return out;
  }
  void synchronize(context<cuda> const& ctx) const { DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream(ctx))); }

 private:
  network_spec spec_;
  int device_ = 0;
  cublasHandle_t blas_ = nullptr;
  std::map<std::string, device_vector<bf16>> mats_;
  std::map<std::string, device_vector<float>> vecs_;
  std::map<std::string, device_vector<unsigned char>> scratch_;
  std::int64_t tokens_ = 0;
  int seq_ = 0, batch_ = 0, pos0_ = 0;
  device_vector<float> h_, temb_, tfeat_, thid_, rope_cos_, rope_sin_;  // rope: [seq × head_dim / 2]
  device_vector<bf16> xb_, ln_, qkv_, att_, ffh_;
  device_vector<unsigned char> attn_ws_, moe_ws_, dist_ws_;

  static cudaStream_t stream(context<cuda> const& ctx) { return cuda_stream(ctx); }
  /// The cuBLAS handle of a call: the context's when it carries one, else the model's own.
  cublasHandle_t blas(context<cuda> const& ctx) const { return ctx.cublas ? ctx.cublas : blas_; }
  /// The call's context with that handle, for the MoE and the anchor calls.
  context<cuda> with_blas(context<cuda> const& ctx) const {
    context<cuda> c = ctx;
    c.cublas = blas(ctx);
    return c;
  }
  bf16 const* mat(std::string const& name) const { return raw(mats_.at(name)); }
  static void fresh_at_least(device_vector<unsigned char>& v, std::size_t bytes) {
    if (v.size() < std::max<std::size_t>(bytes, 1)) fresh(v, bytes);
  }
  /// A named device buffer of at least `bytes`, kept for later calls.
  void* scratch(std::string const& name, std::size_t bytes) {
    auto& v = scratch_[name];
    fresh_at_least(v, bytes);
    return raw(v);
  }
  /// h[r, k] += a[k] + b[k] over rows of d (a, b optional).
  void add_rows(context<cuda> const& ctx, float* h, float const* a, float const* b, int d) const {
    std::size_t const n = std::size_t(tokens_) * d;
    thrust::for_each_n(thrust::cuda::par_nosync.on(stream(ctx)), thrust::counting_iterator<std::size_t>(0), n,
                       model_add_rows_op{h, a, b, d});
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }

  attention_args<bf16> attn_args() {
    auto const& s = spec_.sizes;
    int const dm = s.d_model, hd = s.head_dim();
    attention_args<bf16> a{};
    a.batch = batch_; a.seq = seq_; a.heads = s.heads; a.head_dim = hd;
    tensor_strides const st{std::int64_t(seq_) * 3 * dm, 3 * dm, hd};
    a.q = raw(qkv_); a.k = raw(qkv_) + dm; a.v = raw(qkv_) + 2 * dm;
    a.q_strides = a.k_strides = a.v_strides = st;
    a.o = raw(att_);
    a.o_strides = packed_strides(seq_, s.heads, hd);
    return a;
  }
  router::moe_args<bf16> moe_args(std::string const& pre, double t) {
    auto const& s = spec_.sizes;
    router::moe_args<bf16> a;
    bind_moe_weights(a, pre, s, spec_.activation, [&](std::string const& n) { return mat(n); },
                     [&](std::string const& n) { return weight(n); });
    a.tokens = int(tokens_);
    a.x = raw(ln_);
    a.residual = raw(h_);  // the combine adds the MoE output to the fp32 residual stream
    a.act = spec_.activation == ffn_activation::swiglu ? router::activation::swiglu : router::activation::gelu;
    a.timestep = float(t);
    return a;
  }
};

}  // namespace detail

DRDIFF_NAMESPACE_END
