// The distributed calls on the GPU against one device's call on the same inputs. Sequence-parallel
// attention against drdiff::attention on the whole sequence, with ranks that are threads on one GPU
// (cuda_thread_communicator: P = 1 to 4, every kind of pattern, hsa tiers) and, where NCCL was
// found, over NCCL on every visible GPU (one rank on a one-GPU machine); bf16 and fp32. The
// expert-parallel MoE against router::moe_forward with every expert, ranks as threads; bf16 and fp32.
// The model's forward split over ranks (sequence parallelism) against its whole forward.

#include <drdiff/cuda.cuh>
#if DRDIFF_TEST_NCCL
#include <drdiff/cuda/nccl.cuh>
#endif

#include <catch2/catch.hpp>

#include "../support/ranks.hpp"

#include <cmath>
#include <exception>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <cublas_v2.h>
#include <thrust/copy.h>
#include <thrust/device_vector.h>

#include "../support/device_buffer.cuh"
#include "../support/user_policies.hpp"

using namespace drdiff;

namespace {

using test::dbuf;
using test::from_float;
using test::to_float;

template <class T>
using lse_t = typename attention_args<T>::lse_type;

template <class T>
struct inputs {
  int n, batch, heads, dim;
  std::vector<T> q, k, v;
  std::size_t elems() const { return std::size_t(batch) * n * heads * dim; }
};

template <class T>
inputs<T> make_inputs(int n, int batch, int heads, int dim, unsigned seed) {
  inputs<T> in{n, batch, heads, dim, {}, {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto* x : {&in.q, &in.k, &in.v}) {
    x->resize(in.elems());
    for (auto& e : *x) e = from_float<T>(nd(rng));
  }
  return in;
}

/// One call on the whole sequence (device `dev`): o and lse on the host.
template <class T, class Policy>
void single(Policy const& policy, inputs<T> const& in, std::vector<T>& o, std::vector<lse_t<T>>& lse) {
  dbuf<T> q(in.elems()), k(in.elems()), v(in.elems()), out(in.elems());
  dbuf<lse_t<T>> l(std::size_t(in.batch) * in.heads * in.n);
  q.upload(in.q); k.upload(in.k); v.upload(in.v);
  auto a = make_attention_args<T>(q.ptr, k.ptr, v.ptr, out.ptr, in.batch, in.n, in.heads, in.dim);
  a.maybe_lse = l.ptr;
  context<drdiff::cuda> const ctx{};
  dbuf<unsigned char> ws(attention_workspace_bytes(ctx, policy, a));
  attention(ctx, policy, a, ws.ptr, ws.n);
  DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  o = out.download();
  lse = l.download();
}

/// Rank r's share of a split call, on device `dev` (its own stream), with communicator `comm`:
/// writes its rows of o and lse into the host vectors.
template <class T, class Policy, class Comm>
void rank_call(Policy const& policy, inputs<T> const& in, int dev, Comm& comm, std::vector<T>& o,
               std::vector<lse_t<T>>& lse) {
  DRDIFF_CUDA_CHECK(cudaSetDevice(dev));
  int const P = comm.size(), r = comm.rank();
  attn::chunk const c = attn::sequence_chunk(in.n, P, r);
  std::size_t const re = std::size_t(in.heads) * in.dim;
  // The chunk's rows of every batch, packed [batch, c, heads, dim].
  auto rows = [&](std::vector<T> const& x) {
    std::vector<T> h(std::size_t(in.batch) * c.size() * re);
    for (int b = 0; b < in.batch; ++b)
      std::copy_n(x.begin() + std::ptrdiff_t((std::size_t(b) * in.n + c.begin) * re), std::size_t(c.size()) * re,
                  h.begin() + std::ptrdiff_t(std::size_t(b) * c.size() * re));
    return h;
  };
  std::size_t const ce = std::size_t(in.batch) * c.size() * re;
  dbuf<T> q(ce), k(ce), v(ce), out(ce);
  dbuf<lse_t<T>> l(std::size_t(in.batch) * in.heads * c.size());
  q.upload(rows(in.q)); k.upload(rows(in.k)); v.upload(rows(in.v));
  cudaStream_t stream;
  DRDIFF_CUDA_CHECK(cudaStreamCreate(&stream));
  distributed_context<drdiff::cuda, Comm> d{{stream, dev, nullptr}, &comm};
  distributed_attention_args<T> args;
  args.seq = in.n;
  args.chunk = make_attention_args<T>(q.ptr, k.ptr, v.ptr, out.ptr, in.batch, c.size(), in.heads, in.dim);
  args.chunk.maybe_lse = l.ptr;
  dbuf<unsigned char> ws(distributed_attention_workspace_bytes(d, policy, args));
  distributed_attention(d, policy, args, ws.ptr, ws.n);
  DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
  DRDIFF_CUDA_CHECK(cudaStreamDestroy(stream));
  auto const ho = out.download();
  auto const hl = l.download();
  for (int b = 0; b < in.batch; ++b) {
    std::copy_n(ho.begin() + std::ptrdiff_t(std::size_t(b) * c.size() * re), std::size_t(c.size()) * re,
                o.begin() + std::ptrdiff_t((std::size_t(b) * in.n + c.begin) * re));
    for (int h = 0; h < in.heads; ++h)
      std::copy_n(hl.begin() + std::ptrdiff_t((std::size_t(b) * in.heads + h) * c.size()), c.size(),
                  lse.begin() + std::ptrdiff_t((std::size_t(b) * in.heads + h) * in.n + c.begin));
  }
}

template <class T>
void compare(inputs<T> const& in, std::vector<T> const& o1, std::vector<lse_t<T>> const& l1, std::vector<T> const& o2,
             std::vector<lse_t<T>> const& l2) {
  double const tol = std::is_same_v<T, float> ? 1e-5 : 1.6e-2;  // bf16: one rounding of an O(1) value
  double err = 0, lerr = 0;
  std::size_t bad = 0;
  for (std::size_t e = 0; e < in.elems(); ++e) {
    double const x = to_float(o1[e]), y = to_float(o2[e]);
    if (!(std::abs(x - y) <= tol * (1 + std::abs(x)))) ++bad;
    err = std::max(err, std::abs(x - y));
  }
  for (std::size_t e = 0; e < l1.size(); ++e) lerr = std::max(lerr, std::abs(double(l1[e]) - double(l2[e])));
  INFO("max |o - o_single| " << err << ", max |lse - lse_single| " << lerr);
  CHECK(bad == 0);
  CHECK(lerr <= 1e-3);
}

template <class T, class Policy>
void check_threads(Policy const& policy, int n, int batch, int heads, int dim, int ranks) {
  INFO("N " << n << " batch " << batch << " heads " << heads << " D " << dim << " ranks " << ranks);
  auto const in = make_inputs<T>(n, batch, heads, dim, unsigned(n * 31 + ranks));
  std::vector<T> o1, o2(in.elems());
  std::vector<lse_t<T>> l1, l2(std::size_t(batch) * heads * n);
  single(policy, in, o1, l1);
  thread_comm_group group(ranks);
  auto const errors = test::run_ranks(ranks, [&](int r) {
    cuda_thread_communicator comm(group, r);
    rank_call(policy, in, 0, comm, o2, l2);
  });
  for (auto const& e : errors) REQUIRE(e == "");
  compare(in, o1, l1, o2, l2);
}

}  // namespace

TEST_CASE("distributed attention on one GPU, ranks as threads, equals one call", "[attention][distributed][cuda]") {
  for (int ranks : {1, 2, 3, 4}) {
    check_threads<__nv_bfloat16>(attn::local_window{128} | attn::dilated{4, 512} | attn::global_tokens::first(32),
                                 4096, 1, 4, 64, ranks);
    check_threads<__nv_bfloat16>(attn::hsa{}, 8192, 1, 2, 64, ranks);  // w 256, δ 4 to 2048, 64 globals
    check_threads<__nv_bfloat16>(attn::hsa{}, 20000, 1, 2, 128, ranks);  // δ 8 to 4096, 128 globals
    check_threads<float>(attn::local_window{64} | attn::global_tokens::strided(16), 3000, 2, 2, 64, ranks);
  }
  check_threads<__nv_bfloat16>(attn::hsa{}, 1000, 1, 2, 64, 3);  // the dense tier: every rank holds it all
  check_threads<__nv_bfloat16>(test::small_tiers(), 1200, 1, 2, 64, 6);  // chunks narrower than the reach
}

#if DRDIFF_TEST_NCCL
TEST_CASE("distributed attention over NCCL on every visible GPU equals one call", "[attention][distributed][cuda][nccl]") {
  int devices = 0;
  DRDIFF_CUDA_CHECK(cudaGetDeviceCount(&devices));
  std::vector<int> devs(static_cast<std::size_t>(devices));
  for (int d = 0; d < devices; ++d) devs[std::size_t(d)] = d;
  std::vector<ncclComm_t> comms(static_cast<std::size_t>(devices));
  REQUIRE(ncclCommInitAll(comms.data(), devices, devs.data()) == ncclSuccess);
  auto run = [&](auto const& policy, int n, int heads) {
    INFO("N " << n << " over " << devices << " GPU(s)");
    auto const in = make_inputs<__nv_bfloat16>(n, 1, heads, 64, unsigned(n));
    std::vector<__nv_bfloat16> o1, o2(in.elems());
    std::vector<float> l1, l2(std::size_t(heads) * n);
    DRDIFF_CUDA_CHECK(cudaSetDevice(0));
    single(policy, in, o1, l1);
    auto const errors = test::run_ranks(devices, [&](int r) {
      nccl_communicator comm(comms[std::size_t(r)]);
      rank_call(policy, in, r, comm, o2, l2);
    });
    for (auto const& e : errors) REQUIRE(e == "");
    compare(in, o1, l1, o2, l2);
  };
  run(attn::hsa{}, 32768, 4);
  run(attn::local_window{256} | attn::dilated{8, 4096} | attn::global_tokens::strided(64), 16384, 2);
  for (auto c : comms) ncclCommDestroy(c);
}
#endif

namespace {

/// The expert-parallel MoE over `ranks` threads on GPU 0 against one moe_forward (fp32 accumulation
/// both; bf16 rounds the expert rows and the output once each).
template <class T, class Router>
void check_moe(Router const& r, int n, int d, int f, int E, int S, int ranks) {
  INFO("tokens " << n << " d " << d << " d_ff " << f << " E " << E << " shared " << S << " ranks " << ranks);
  std::mt19937 rng(unsigned(n + ranks));
  std::normal_distribution<float> nd(0.f, 1.f);
  auto make = [&](std::size_t size, float scale) {
    std::vector<T> v(size);
    for (auto& e : v) e = from_float<T>(nd(rng) * scale);
    return v;
  };
  auto const x = make(std::size_t(n) * d, 1.f), wr = make(std::size_t(E) * d, 0.5f),
             up = make(std::size_t(E) * f * d, 0.1f), down = make(std::size_t(E) * d * f, 0.1f),
             sup = make(std::size_t(S) * f * d, 0.1f), sdown = make(std::size_t(S) * d * f, 0.1f);
  auto upload = [](std::vector<T> const& h) {
    auto b = std::make_unique<dbuf<T>>(h.size());
    b->upload(h);
    return b;
  };
  auto dx = upload(x), dwr = upload(wr), dup = upload(up), ddown = upload(down), dsup = upload(sup),
       dsdown = upload(sdown);
  router::moe_args<T> a;
  a.tokens = n; a.d_model = d; a.d_ff = f; a.experts = E;
  a.x = dx->ptr; a.w_router = dwr->ptr; a.w_up = dup->ptr; a.w_down = ddown->ptr;
  a.shared_experts = S;
  a.w_shared_up = S ? dsup->ptr : nullptr;
  a.w_shared_down = S ? dsdown->ptr : nullptr;
  dbuf<T> out1(std::size_t(n) * d), out2(std::size_t(n) * d);
  a.out = out1.ptr;
  cublasHandle_t handle;
  REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
  context<drdiff::cuda> ctx{};
  ctx.cublas = handle;
  {
    dbuf<unsigned char> ws(router::moe_workspace_bytes(ctx, r, a));
    router::moe_forward(ctx, r, a, ws.ptr, ws.n);
    DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
  }
  cublasDestroy(handle);
  thread_comm_group group(ranks);
  auto const errors = test::run_ranks(ranks, [&](int rank) {
    cublasHandle_t h;
    DRDIFF_CHECK(cublasCreate(&h) == CUBLAS_STATUS_SUCCESS, "cublasCreate");
    cudaStream_t stream;
    DRDIFF_CUDA_CHECK(cudaStreamCreate(&stream));
    cuda_thread_communicator comm(group, rank);
    distributed_context<drdiff::cuda, cuda_thread_communicator> dc{{stream, 0, h}, &comm};
    attn::chunk const c = attn::sequence_chunk(n, ranks, rank);
    int const El = E / ranks;
    router::distributed_moe_args<T> args;
    args.local = a;
    args.local.tokens = c.size();
    args.local.x = dx->ptr + std::size_t(c.begin) * d;
    args.local.w_up = dup->ptr + std::size_t(rank) * El * f * d;
    args.local.w_down = ddown->ptr + std::size_t(rank) * El * d * f;
    args.local.out = out2.ptr + std::size_t(c.begin) * d;
    {
      dbuf<unsigned char> ws(router::distributed_moe_workspace_bytes(dc, r, args));
      router::distributed_moe_forward(dc, r, args, ws.ptr, ws.n);
      DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
    }
    DRDIFF_CUDA_CHECK(cudaStreamDestroy(stream));
    cublasDestroy(h);
  });
  for (auto const& e : errors) REQUIRE(e == "");
  auto const o1 = out1.download(), o2 = out2.download();
  double const tol = std::is_same_v<T, float> ? 1e-4 : 2e-2;
  std::size_t bad = 0;
  double err = 0;
  for (std::size_t i = 0; i < o1.size(); ++i) {
    double const u = to_float(o1[i]), v = to_float(o2[i]);
    err = std::max(err, std::abs(u - v));
    if (!(std::abs(u - v) <= tol * (1 + std::abs(u)))) ++bad;
  }
  INFO("max |out - out_single| " << err);
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("expert-parallel MoE on one GPU, ranks as threads, equals one call", "[router][moe][distributed][cuda]") {
  for (int ranks : {1, 2, 4}) {
    check_moe<float>(router::top_k{2, true}, 1000, 128, 256, 8, 0, ranks);
    check_moe<__nv_bfloat16>(router::top_k{2, true}, 2048, 256, 512, 16, 1, ranks);
    check_moe<__nv_bfloat16>(router::top_p{0.5f, 1, 4, false}, 777, 128, 256, 8, 2, ranks);
  }
}

TEST_CASE("GPU model forward split over ranks equals the whole forward", "[model][distributed][cuda]") {
  // Every expert active (routing continuous in the input), so the only differences are bf16 roundings
  // in another order.
  model_config<> c = presets::tiny();
  c.router.k = c.sizes.experts;
  c.sizes.blocks = 2;
  c.attention = test::small_tiers();  // N = 700: window 16, δ = 8, span 256, 16 globals
  int const batch = 1, seq = 700, de = c.sizes.embed_dim;
  model<drdiff::cuda, model_config<>> whole(c);
  whole.init_random(17);
  std::size_t const n = std::size_t(batch) * seq * de;
  std::vector<float> x(n);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (auto& e : x) e = nd(rng);
  thrust::device_vector<float> dx(x.begin(), x.end()), dy(n);
  whole.forward(context<drdiff::cuda>{}, thrust::raw_pointer_cast(dx.data()), 0.41, thrust::raw_pointer_cast(dy.data()),
                batch, seq);
  std::vector<float> want(n);
  thrust::copy(dy.begin(), dy.end(), want.begin());
  for (int ranks : {1, 2, 3}) {
    INFO("ranks " << ranks);
    std::vector<float> got(n, std::nanf(""));
    thread_comm_group group(ranks);
    auto const errors = test::run_ranks(ranks, [&](int r) {
      DRDIFF_CUDA_CHECK(cudaSetDevice(0));
      model<drdiff::cuda, model_config<>> m(c, whole.weights());
      cudaStream_t stream;
      DRDIFF_CUDA_CHECK(cudaStreamCreate(&stream));
      cuda_thread_communicator comm(group, r);
      distributed_context<drdiff::cuda, cuda_thread_communicator> d{{stream, 0, nullptr}, &comm};
      attn::chunk const ch = attn::sequence_chunk(seq, ranks, r);
      std::size_t const rows = std::size_t(ch.size()) * de;
      thrust::device_vector<float> cx(x.begin() + std::ptrdiff_t(std::size_t(ch.begin) * de),
                                      x.begin() + std::ptrdiff_t(std::size_t(ch.begin) * de + rows)),
          cy(rows);
      m.forward(d, thrust::raw_pointer_cast(cx.data()), 0.41, thrust::raw_pointer_cast(cy.data()), batch, seq);
      DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
      thrust::copy(cy.begin(), cy.end(), got.begin() + std::ptrdiff_t(std::size_t(ch.begin) * de));
      DRDIFF_CUDA_CHECK(cudaStreamDestroy(stream));
    });
    for (auto const& e : errors) REQUIRE(e == "");
    double err = 0, mag = 0;
    for (std::size_t i = 0; i < n; ++i) {
      REQUIRE(std::isfinite(got[i]));
      err = std::max(err, double(std::abs(want[i] - got[i])));
      mag = std::max(mag, double(std::abs(want[i])));
    }
    INFO("max difference " << err << " of max " << mag);
    CHECK(err <= 3e-2 * mag);
  }
}
