#pragma once
/// \file
/// The DrDiff model on the GPU: bf16 weights and activations with fp32 accumulation, an fp32
/// residual stream, linear layers through cuBLAS (bf16 inputs, fp32 or bf16 outputs), attention
/// through drdiff::attention (tensor cores, any policy), the routed MoE through router::moe_forward
/// (a model with one expert runs its FFN as two plain GEMMs), the solver state in fp32 on the
/// device (solver::dpmpp_sample for context<cuda>), anchor hooks and rounding on the device.
/// Include from a .cu file and link CUDA::cublas.

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/attention.hpp>
#include <drdiff/cuda/anchor.cuh>
#include <drdiff/cuda/attention.cuh>
#include <drdiff/cuda/detail/blas.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/moe.cuh>
#include <drdiff/cuda/solver.cuh>
#include <drdiff/model/model.hpp>
#include <drdiff/model/weights.hpp>
#include <drdiff/solver/grid.hpp>

#include <cub/block/block_reduce.cuh>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <map>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

using bf16 = __nv_bfloat16;

inline unsigned model_grid(std::size_t n) { return unsigned(std::min<std::size_t>((n + 255) / 256, 132 * 32)); }
#define DRDIFF_GRID_STRIDE(i, n) \
  for (std::size_t i = blockIdx.x * std::size_t(blockDim.x) + threadIdx.x; i < (n); i += std::size_t(gridDim.x) * blockDim.x)

static __global__ void model_to_bf16(float const* __restrict__ x, bf16* __restrict__ y, std::size_t n) {
  DRDIFF_GRID_STRIDE(i, n) y[i] = __float2bfloat16(x[i]);
}
/// h[r, k] += a[k] + b[k] (a, b optional), fp32.
static __global__ void model_add_rows(float* __restrict__ h, float const* __restrict__ a, float const* __restrict__ b,
                               std::size_t n, int d) {
  DRDIFF_GRID_STRIDE(i, n) {
    int const k = int(i % d);
    h[i] += (a ? a[k] : 0.f) + (b ? b[k] : 0.f);
  }
}
/// Sum over the 128 threads of a block (red: 4 floats of shared memory; safe to call again at once).
__device__ inline float model_block_sum(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  return red[0] + red[1] + red[2] + red[3];
}

/// LayerNorm of fp32 rows into bf16, one block of 128 threads per row (statistics in fp32, two passes).
static __global__ void __launch_bounds__(128) model_layer_norm(float const* __restrict__ x, int d, float const* __restrict__ g,
                                                       float const* __restrict__ b, float eps, bf16* __restrict__ y) {
  __shared__ float red[4];
  float const* xr = x + std::size_t(blockIdx.x) * d;
  float s = 0.f;
  for (int k = threadIdx.x; k < d; k += 128) s += xr[k];
  float const mean = model_block_sum(s, red) / d;
  float q = 0.f;
  for (int k = threadIdx.x; k < d; k += 128) q += (xr[k] - mean) * (xr[k] - mean);
  float const inv = rsqrtf(model_block_sum(q, red) / d + eps);
  for (int k = threadIdx.x; k < d; k += 128)
    y[std::size_t(blockIdx.x) * d + k] = __float2bfloat16((xr[k] - mean) * inv * g[k] + b[k]);
}

/// The same for d a multiple of 4 and at most 512·K: each thread keeps its K float4 pieces of the row
/// in registers, so the row is read from memory once (the same two-pass statistics).
template <int K>
static __global__ void __launch_bounds__(128) model_layer_norm_vec(float const* __restrict__ x, int d,
                                                           float const* __restrict__ g, float const* __restrict__ b,
                                                           float eps, bf16* __restrict__ y) {
  __shared__ float red[4];
  int const n4 = d / 4;
  auto const* xr = reinterpret_cast<float4 const*>(x + std::size_t(blockIdx.x) * d);
  float4 v[K];
  float s = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int const i = int(threadIdx.x) + 128 * k;
    v[k] = i < n4 ? xr[i] : make_float4(0.f, 0.f, 0.f, 0.f);
    s += (v[k].x + v[k].y) + (v[k].z + v[k].w);
  }
  float const mean = model_block_sum(s, red) / d;
  float q = 0.f;
#pragma unroll
  for (int k = 0; k < K; ++k)
    if (int(threadIdx.x) + 128 * k < n4) {
      float const a = v[k].x - mean, c = v[k].y - mean, e = v[k].z - mean, f = v[k].w - mean;
      q += (a * a + c * c) + (e * e + f * f);
    }
  float const inv = rsqrtf(model_block_sum(q, red) / d + eps);
  auto* const yr = reinterpret_cast<uint2*>(y + std::size_t(blockIdx.x) * d);
#pragma unroll
  for (int k = 0; k < K; ++k) {
    int const i = int(threadIdx.x) + 128 * k;
    if (i >= n4) continue;
    float4 const gg = reinterpret_cast<float4 const*>(g)[i], bb = reinterpret_cast<float4 const*>(b)[i];
    __nv_bfloat162 const lo = __floats2bfloat162_rn((v[k].x - mean) * inv * gg.x + bb.x,
                                                    (v[k].y - mean) * inv * gg.y + bb.y);
    __nv_bfloat162 const hi = __floats2bfloat162_rn((v[k].z - mean) * inv * gg.z + bb.z,
                                                    (v[k].w - mean) * inv * gg.w + bb.w);
    uint2 o;
    o.x = *reinterpret_cast<unsigned const*>(&lo);
    o.y = *reinterpret_cast<unsigned const*>(&hi);
    yr[i] = o;
  }
}

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

/// The RoPE table: cos and sin of p·base^(−2i/hd) for every position p < seq and pair i < hd/2, computed
/// in double as on the CPU (once per sequence length).
static __global__ void model_rope_table(float* __restrict__ cs, float* __restrict__ sn, int seq, int half, double base) {
  std::size_t const n = std::size_t(seq) * half;
  DRDIFF_GRID_STRIDE(i, n) {
    int const pair = int(i % half);
    double const a = double(i / half) * pow(base, -2.0 * pair / (2 * half));
    cs[i] = float(cos(a));
    sn[i] = float(sin(a));
  }
}

/// RoPE on q and k of a [T, 3·d_model] bf16 buffer from the table: one thread per 16-byte piece (4
/// pairs) of a token's q or k (head_dim a multiple of 8, so pieces never straddle heads).
static __global__ void model_rope(bf16* __restrict__ qkv, float const* __restrict__ cs, float const* __restrict__ sn,
                           std::int64_t tokens, int seq, int dm, int hd) {
  int const pieces = dm / 8, half = hd / 2;  // pieces per part (q or k) of a token
  std::size_t const n = std::size_t(tokens) * 2 * pieces;
  DRDIFF_GRID_STRIDE(i, n) {
    int const c = int(i % pieces);
    std::size_t const rest = i / pieces;
    int const part = int(rest % 2);
    std::int64_t const r = std::int64_t(rest / 2);
    int const pair0 = (c * 8 % hd) / 2;
    std::size_t const at = std::size_t(r % seq) * half + pair0;
    float4 const cv = *reinterpret_cast<float4 const*>(cs + at), sv = *reinterpret_cast<float4 const*>(sn + at);
    float const cc[4] = {cv.x, cv.y, cv.z, cv.w}, ss[4] = {sv.x, sv.y, sv.z, sv.w};
    uint4* const p = reinterpret_cast<uint4*>(qkv + std::size_t(r) * 3 * dm + std::size_t(part) * dm + std::size_t(c) * 8);
    uint4 v = *p;
    __nv_bfloat162* const e = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      float2 const ab = __bfloat1622float2(e[k]);
      e[k] = __floats2bfloat162_rn(ab.x * cc[k] - ab.y * ss[k], ab.x * ss[k] + ab.y * cc[k]);
    }
    *p = v;
  }
}

/// y[o] = act(Σ_i W[o, i]·x[i] + b[o]): one warp per output (the time MLP).
static __global__ void model_matvec(bf16 const* __restrict__ w, float const* __restrict__ x, float const* __restrict__ b,
                             int out, int in, bool silu, float* __restrict__ y) {
  int const o = (blockIdx.x * blockDim.x + threadIdx.x) >> 5, lane = threadIdx.x & 31;
  if (o >= out) return;
  float acc = 0.f;
  for (int i = lane; i < in; i += 32) acc += __bfloat162float(w[std::size_t(o) * in + i]) * x[i];
  for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
  if (lane == 0) {
    acc += b[o];
    y[o] = silu ? acc / (1.f + __expf(-acc)) : acc;
  }
}

/// The initial state: target tokens get N(0, 1) noise (counter-based, as on the CPU) plus m; source
/// tokens their clean embedding.
static __global__ void model_initial_state(float* __restrict__ x, float const* __restrict__ clean,
                                    unsigned char const* __restrict__ target, float const* __restrict__ m,
                                    solver::gaussian_noise noise, std::size_t n, int d) {
  DRDIFF_GRID_STRIDE(i, n) x[i] = target[i / d] ? float(noise(0, i)) + m[i % d] : clean[i];
}

#undef DRDIFF_GRID_STRIDE

struct model_max_op {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};

/// In place on each row of L [rows × vocab] (fp32): softmax. A NaN in a row makes the whole row
/// NaN, so the categorical x̂0 of that token is NaN and the solver reports it (never a plausible row).
template <int Threads>
static __global__ void __launch_bounds__(Threads) model_softmax_rows(float* __restrict__ L, int vocab) {
  using reduce = cub::BlockReduce<float, Threads>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ float bcast;
  float* row = L + std::size_t(blockIdx.x) * vocab;
  float mx = -INFINITY, nan = 0.f;
  for (int v = threadIdx.x; v < vocab; v += Threads) {
    float const x = row[v];
    nan += isnan(x) ? 1.f : 0.f;
    mx = fmaxf(mx, x);
  }
  float const bmx = reduce(tmp).Reduce(mx, model_max_op{});
  if (threadIdx.x == 0) bcast = bmx;
  __syncthreads();
  float const m = bcast;
  __syncthreads();
  float const bnan = reduce(tmp).Sum(nan);
  __syncthreads();
  float sum = 0.f;
  for (int v = threadIdx.x; v < vocab; v += Threads) sum += (row[v] = __expf(row[v] - m));
  float const bsum = reduce(tmp).Sum(sum);
  if (threadIdx.x == 0) bcast = bnan > 0.f ? NAN : 1.f / bsum;
  __syncthreads();
  float const inv = bcast;
  for (int v = threadIdx.x; v < vocab; v += Threads) row[v] *= inv;
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

}  // namespace detail

template <class Config>
class model<cuda, Config> {
 public:
  using config_type = Config;
  using bf16 = __nv_bfloat16;

  /// Uploads `w` (matrices as bf16; vectors, norms and the embedding table kept in fp32).
  model(Config cfg, model_weights const& w, context<cuda> ctx = {}) : cfg_(std::move(cfg)), ctx_(ctx) {
    cfg_.validate();
    detail::cublas_check(cublasCreate(&blas_), "cublasCreate");
    for (auto const& s : w.specs()) {
      auto const& v = w.tensor(s.name);
      bool const matrix = s.shape.size() >= 2 && s.name != "embed.weight";
      if (matrix) {
        std::vector<bf16> h(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) h[i] = __float2bfloat16(v[i]);
        upload(s.name, h.data(), h.size() * sizeof(bf16));
      } else {
        upload(s.name, v.data(), v.size() * sizeof(float));
      }
    }
    host_embed_ = w.tensor("embed.weight");
  }
  model(model const&) = delete;
  model& operator=(model const&) = delete;
  ~model() {
    for (auto& kv : tensors_) cudaFree(kv.second);
    for (void* p : buffers_) cudaFree(p);
    for (auto& kv : scratch_) cudaFree(kv.second.first);
    if (blas_) cublasDestroy(blas_);
  }

  Config const& config() const noexcept { return cfg_; }
  context<cuda> const& ctx() const noexcept { return ctx_; }

  /// x̂0 = model(x_t, t) on the device ([batch, seq, embed_dim] fp32 in and out). With `timing`, the
  /// components are timed with CUDA events (and the call synchronises).
  void forward(float const* xt, double t, float* x0, int batch, int seq, model_timing* timing = nullptr) {
    DRDIFF_CHECK(batch > 0 && seq > 0, "model: batch = ", batch, " and seq = ", seq, " must be > 0");
    DRDIFF_CHECK(xt != nullptr && x0 != nullptr, "model: x_t or x0 is a null pointer");
    DRDIFF_CHECK(std::isfinite(t), "model: t = ", t, " is not finite");
    auto const& s = cfg_.sizes;
    int const dm = s.d_model, de = s.embed_dim, hd = s.head_dim();
    std::int64_t const T = std::int64_t(batch) * seq;
    DRDIFF_CHECK(T * 3 * dm < (std::int64_t(1) << 31) * 8, "model (cuda): ", T, " tokens are too many");
    auto const st = stream();
    detail::cublas_check(cublasSetStream(blas_, st), "cublasSetStream");
    prepare(batch, seq);
    event_timer ev(timing, st);
    // Input: up-projection plus the time embedding (fp32 residual stream).
    ev.begin();
    time_embedding(t);
    detail::model_to_bf16<<<detail::model_grid(std::size_t(T) * de), 256, 0, st>>>(xt, xb_, std::size_t(T) * de);
    detail::gemm_bf16(blas_, int(T), dm, de, xb_, m("up.weight"), h_, 0.f);
    detail::model_add_rows<<<detail::model_grid(std::size_t(T) * dm), 256, 0, st>>>(h_, v("up.bias"), temb_,
                                                                                   std::size_t(T) * dm, dm);
    ev.end(&model_timing::dense);
    for (int b = 0; b < s.blocks; ++b) {
      std::string const pre = "blocks." + std::to_string(b) + ".";
      ev.begin();
      detail::model_norm(h_, dm, v(pre + "norm1.weight"), v(pre + "norm1.bias"), cfg_.norm_eps, ln_, T, st);
      detail::gemm_bf16(blas_, int(T), 3 * dm, dm, ln_, m(pre + "attn.qkv.weight"), qkv_, 0.f);
      detail::model_rope<<<detail::model_grid(std::size_t(T) * dm / 4), 256, 0, st>>>(qkv_, rope_cos_, rope_sin_, T,
                                                                                     seq, dm, hd);
      ev.end(&model_timing::dense);
      ev.begin();
      attention(ctx_, cfg_.attention, attn_args(batch, seq), attn_ws_, attn_bytes_);
      ev.end(&model_timing::attention);
      ev.begin();
      detail::gemm_bf16(blas_, int(T), dm, dm, att_, m(pre + "attn.out.weight"), h_, 1.f);
      detail::model_norm(h_, dm, v(pre + "norm2.weight"), v(pre + "norm2.bias"), cfg_.norm_eps, ln_, T, st);
      ev.end(&model_timing::dense);
      ev.begin();
      if (s.experts == 1 && s.shared_experts == 0 && cfg_.activation == ffn_activation::gelu) {  // a dense FFN
        detail::gemm_bf16(blas_, int(T), s.d_ff, dm, ln_, m(pre + "moe.experts.up"), ffh_, 0.f);
        router::detail::moe_activate(ffh_, static_cast<bf16 const*>(nullptr), std::size_t(T) * s.d_ff, false, st);
        detail::gemm_bf16(blas_, int(T), dm, s.d_ff, ffh_, m(pre + "moe.experts.down"), h_, 1.f);
      } else {
        auto a = moe_args(pre, T, t);
        router::moe_forward(ctx_, cfg_.router, a, moe_ws_, moe_bytes_);  // added to h_ in its combine
      }
      ev.end(&model_timing::moe);
    }
    ev.begin();
    detail::model_norm(h_, dm, v("norm.weight"), v("norm.bias"), cfg_.norm_eps, ln_, T, st);
    detail::gemm_bf16(blas_, int(T), de, dm, ln_, m("down.weight"), x0, 0.f);
    detail::model_add_rows<<<detail::model_grid(std::size_t(T) * de), 256, 0, st>>>(x0, v("down.bias"), nullptr,
                                                                                   std::size_t(T) * de, de);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    if (cfg_.output == prediction::categorical) {
      std::int64_t const chunk = std::min<std::int64_t>(T, 4096);
      auto* L = static_cast<float*>(scratch("categorical", std::size_t(chunk) * s.vocab * sizeof(float)));
      detail::model_categorical(blas_, x0, T, de, v("embed.weight"), s.vocab, L, chunk, st);
    }
    ev.end(&model_timing::dense);
    ev.finish();
  }

  /// The CPU model's generation on the GPU: noise (the same counter-based numbers) → DPM-Solver++
  /// with the hooks → rounding. Deterministic for a seed on a given GPU and build.
  generation_result generate(generation_request const& req, bool time_components = false) {
    auto const& s = cfg_.sizes;
    auto const start = std::chrono::steady_clock::now();
    detail::generation_layout const lay(req, s.vocab, host_embed_.data(), s.embed_dim);
    int const P = lay.prompt, N = lay.tokens, de = s.embed_dim;
    std::size_t const n = std::size_t(N) * de;
    anchor::token_shape const shape{1, N, de};
    auto const st = stream();
    auto const& target = lay.target;
    auto const& clean = lay.clean;
    auto* d_target = static_cast<unsigned char*>(scratch("gen.target", target.size()));
    auto* d_clean = static_cast<float*>(scratch("gen.clean", n * sizeof(float)));
    auto* x = static_cast<float*>(scratch("gen.x", n * sizeof(float)));
    auto* ws = static_cast<float*>(scratch("gen.ws", solver::sample_workspace_size<float>(n) * sizeof(float)));
    auto* guide_scratch = static_cast<float*>(scratch("gen.guide", n * sizeof(float)));
    auto* ids = static_cast<int*>(scratch("gen.ids", std::size_t(N) * sizeof(int)));
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(d_target, target.data(), target.size(), cudaMemcpyHostToDevice, st));
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(d_clean, clean.data(), n * sizeof(float), cudaMemcpyHostToDevice, st));
    detail::model_initial_state<<<detail::model_grid(n), 256, 0, st>>>(x, d_clean, d_target, v("absorbing"),
                                                                       solver::gaussian_noise{req.seed}, n, de);
    DRDIFF_CUDA_CHECK(cudaGetLastError());

    generation_result res;
    auto const ops = solver::ops(cfg_.schedule);
    auto const grid = solver::make_grid(ops, cfg_.steps, cfg_.spacing, cfg_.t_start, cfg_.t_end);
    auto den = [&](float const* xs, double t, float* out) {
      forward(xs, t, out, 1, N, time_components ? &res.timing : nullptr);
      ++res.evaluations;
    };
    anchor::keep_clean<cuda, float> keep(ctx_, shape, d_target, d_clean);
    anchor::nearest_embedding<float> const table{v("embed.weight"), s.vocab, de, cfg_.rounding};
    std::size_t const pbytes = anchor::projector_workspace_bytes(ctx_, table, shape);
    void* pws = scratch("gen.proj", pbytes);
    auto guide = anchor::make_guidance(ctx_, shape, anchor::bind<float>(ctx_, blas_, table, shape, pws, pbytes),
                                       cfg_.guidance_schedule, ops, guide_scratch);
    auto x0_hook = [&](float* x0, double t, int step) {
      if (cfg_.guidance) guide(x0, t, step);
      keep(x0, t, step);
    };
    auto xt_hook = [&](float* xs, double t, int step) {
      keep(xs, t, step);
      if (req.progress) {
        DRDIFF_CUDA_CHECK(cudaStreamSynchronize(st));
        req.progress(step + 1, cfg_.steps);
      }
    };
    double const before = res.timing.total();
    auto const t_solve = std::chrono::steady_clock::now();
    solver::dpmpp_sample(ctx_, ops, cfg_.solver, grid, den, x, n, ws, x0_hook, xt_hook);
    double const solve = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_solve).count();
    if (time_components) res.timing.solver += std::max(0.0, solve - (res.timing.total() - before));
    auto const t_round = std::chrono::steady_clock::now();
    std::size_t const rbytes = anchor::workspace_bytes(ctx_, table, shape);
    anchor::round_to_nearest(ctx_, blas_, table, shape, static_cast<float const*>(x), ids, static_cast<float*>(nullptr),
                             scratch("gen.round", rbytes), rbytes);  // synchronises
    res.timing.rounding += std::chrono::duration<double>(std::chrono::steady_clock::now() - t_round).count();
    std::vector<int> all(static_cast<std::size_t>(N));
    DRDIFF_CUDA_CHECK(cudaMemcpy(all.data(), ids, all.size() * sizeof(int), cudaMemcpyDeviceToHost));
    res.tokens.assign(all.begin() + P, all.end());
    res.steps = cfg_.steps;
    res.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return res;
  }

 private:
  Config cfg_;
  context<cuda> ctx_;
  cublasHandle_t blas_ = nullptr;
  std::map<std::string, void*> tensors_;
  std::map<std::string, std::pair<void*, std::size_t>> scratch_;
  std::vector<void*> buffers_;
  std::vector<float> host_embed_;
  std::int64_t tokens_ = 0;
  int seq_ = 0, batch_ = 0;
  float *h_ = nullptr, *temb_ = nullptr, *tfeat_ = nullptr, *thid_ = nullptr;
  bf16 *xb_ = nullptr, *ln_ = nullptr, *qkv_ = nullptr, *att_ = nullptr, *ffh_ = nullptr;
  float *rope_cos_ = nullptr, *rope_sin_ = nullptr;  // [seq × head_dim / 2]
  void *attn_ws_ = nullptr, *moe_ws_ = nullptr;
  std::size_t attn_bytes_ = 0, moe_bytes_ = 0;

  cudaStream_t stream() const { return reinterpret_cast<cudaStream_t>(ctx_.stream); }
  void upload(std::string const& name, void const* src, std::size_t bytes) {
    void* p = nullptr;
    DRDIFF_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(bytes, 1)));
    tensors_[name] = p;
    DRDIFF_CUDA_CHECK(cudaMemcpy(p, src, bytes, cudaMemcpyHostToDevice));
  }
  bf16 const* m(std::string const& name) const { return static_cast<bf16 const*>(tensors_.at(name)); }
  float const* v(std::string const& name) const { return static_cast<float const*>(tensors_.at(name)); }
  void* alloc(std::size_t bytes) {
    void* p = nullptr;
    DRDIFF_CUDA_CHECK(cudaMalloc(&p, std::max<std::size_t>(bytes, 1)));
    buffers_.push_back(p);
    return p;
  }
  /// A named device buffer of at least `bytes`, kept for later calls.
  void* scratch(std::string const& name, std::size_t bytes) {
    auto& e = scratch_[name];
    if (e.second < bytes) {
      if (e.first) cudaFree(e.first);
      e.first = nullptr;
      DRDIFF_CUDA_CHECK(cudaMalloc(&e.first, std::max<std::size_t>(bytes, 1)));
      e.second = bytes;
    }
    return e.first;
  }

  attention_args<bf16> attn_args(int batch, int seq) const {
    auto const& s = cfg_.sizes;
    int const dm = s.d_model, hd = s.head_dim();
    attention_args<bf16> a{};
    a.batch = batch; a.seq = seq; a.heads = s.heads; a.head_dim = hd;
    tensor_strides const st{std::int64_t(seq) * 3 * dm, 3 * dm, hd};
    a.q = qkv_; a.k = qkv_ + dm; a.v = qkv_ + 2 * dm;
    a.q_strides = a.k_strides = a.v_strides = st;
    a.o = att_;
    a.o_strides = packed_strides(seq, s.heads, hd);
    return a;
  }
  router::cuda_moe_args<bf16> moe_args(std::string const& pre, std::int64_t T, double t) const {
    auto const& s = cfg_.sizes;
    router::cuda_moe_args<bf16> a;
    detail::bind_moe_weights(a, pre, s, cfg_.activation, [&](std::string const& n) { return m(n); },
                             [&](std::string const& n) { return v(n); });
    a.tokens = int(T);
    a.x = ln_;
    a.residual = h_;  // the combine adds the MoE output to the fp32 residual stream
    a.act = cfg_.activation == ffn_activation::swiglu ? router::cuda_activation::swiglu : router::cuda_activation::gelu;
    a.timestep = float(t);
    a.cublas = blas_;
    return a;
  }

  /// Activation buffers and workspaces for `batch` × `seq` tokens (reallocated when the shape grows).
  void prepare(int batch, int seq) {
    std::int64_t const T = std::int64_t(batch) * seq;
    if (T == tokens_ && seq == seq_ && batch == batch_) return;
    for (void* p : buffers_) cudaFree(p);
    buffers_.clear();
    auto const& s = cfg_.sizes;
    std::size_t const dm = std::size_t(s.d_model);
    h_ = static_cast<float*>(alloc(sizeof(float) * T * dm));
    temb_ = static_cast<float*>(alloc(sizeof(float) * dm));
    thid_ = static_cast<float*>(alloc(sizeof(float) * dm));
    tfeat_ = static_cast<float*>(alloc(sizeof(float) * s.time_dim));
    xb_ = static_cast<bf16*>(alloc(sizeof(bf16) * T * s.embed_dim));
    ln_ = static_cast<bf16*>(alloc(sizeof(bf16) * T * dm));
    qkv_ = static_cast<bf16*>(alloc(sizeof(bf16) * T * 3 * dm));
    att_ = static_cast<bf16*>(alloc(sizeof(bf16) * T * dm));
    if (s.experts == 1) ffh_ = static_cast<bf16*>(alloc(sizeof(bf16) * T * s.d_ff));
    std::size_t const rope_n = std::size_t(seq) * (s.head_dim() / 2);
    rope_cos_ = static_cast<float*>(alloc(sizeof(float) * rope_n));
    rope_sin_ = static_cast<float*>(alloc(sizeof(float) * rope_n));
    detail::model_rope_table<<<detail::model_grid(rope_n), 256, 0, stream()>>>(rope_cos_, rope_sin_, seq,
                                                                              s.head_dim() / 2, cfg_.rope_base);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    attn_bytes_ = attention_workspace_bytes(ctx_, cfg_.attention, attn_args(batch, seq));
    attn_ws_ = alloc(attn_bytes_);
    moe_bytes_ = router::moe_workspace_bytes(cfg_.router, moe_args("blocks.0.", T, 0.0));
    moe_ws_ = alloc(moe_bytes_);
    tokens_ = T;
    seq_ = seq;
    batch_ = batch;
  }

  void time_embedding(double t) {
    auto const& s = cfg_.sizes;
    int const td = s.time_dim, half = td / 2, dm = s.d_model;
    std::vector<float> f(static_cast<std::size_t>(td));
    for (int i = 0; i < half; ++i) {
      double const a = std::exp(-std::log(10000.0) * i / half) * 1000.0 * t;
      f[std::size_t(i)] = float(std::cos(a));
      f[std::size_t(half + i)] = float(std::sin(a));
    }
    auto const st = stream();
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(tfeat_, f.data(), f.size() * sizeof(float), cudaMemcpyHostToDevice, st));
    detail::model_matvec<<<(dm * 32 + 255) / 256, 256, 0, st>>>(m("time.fc1.weight"), tfeat_, v("time.fc1.bias"), dm, td,
                                                                true, thid_);
    detail::model_matvec<<<(dm * 32 + 255) / 256, 256, 0, st>>>(m("time.fc2.weight"), thid_, v("time.fc2.bias"), dm, dm,
                                                                false, temb_);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }

  /// CUDA events around components; the elapsed times are added at finish() (one synchronisation).
  class event_timer {
   public:
    event_timer(model_timing* t, cudaStream_t s) : t_(t), s_(s) {}
    ~event_timer() {
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
};

DRDIFF_NAMESPACE_END
