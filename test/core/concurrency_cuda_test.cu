// Several host threads at once, each with its own CUDA stream and workspace: drdiff::attention (bf16,
// the HSA tiers) and the model forward (one model object per thread) give results bit-identical to
// the same calls made one after another (docs/architecture.md, "Thread safety").

#include "../support/threads.hpp"

#include <drdiff/cpu/model.hpp>
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/model.cuh>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstring>
#include <list>
#include <memory>
#include <random>
#include <thread>
#include <vector>

#include <thrust/device_vector.h>

using namespace drdiff;
using gpu = drdiff::cuda;

namespace {


/// A device copy of h, owned by Thrust in `store` for the test case (a list: stable addresses).
template <class T>
T* device_copy(std::list<thrust::device_vector<T>>& store, std::vector<T> const& h) {
  store.emplace_back(h.begin(), h.end());
  return thrust::raw_pointer_cast(store.back().data());
}

template <class T>
std::vector<T> host_copy(T const* d, std::size_t n) {
  std::vector<T> h(n);
  DRDIFF_CUDA_CHECK(cudaMemcpy(h.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return h;
}

bool same_bits(std::vector<__nv_bfloat16> const& a, std::vector<__nv_bfloat16> const& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(__nv_bfloat16)) == 0;
}

}  // namespace

TEST_CASE("CUDA attention on 4 streams from 4 threads equals sequential calls, bit for bit", "[core][threads][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  int const n = 5000, heads = 4, dim = 64;  // N above 4,096: the tier with dilation 4 and 64 global tokens
  std::size_t const elems = std::size_t(n) * heads * dim;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::list<thrust::device_vector<__nv_bfloat16>> store;
  std::vector<__nv_bfloat16*> q(4), k(4), v(4), o(4);
  for (int i = 0; i < 4; ++i) {
    std::vector<__nv_bfloat16> h(elems);
    for (auto* d : {&q[i], &k[i], &v[i]}) {
      for (auto& x : h) x = __float2bfloat16(nd(rng));
      *d = device_copy(store, h);
    }
    o[i] = device_copy(store, std::vector<__nv_bfloat16>(elems, __float2bfloat16(0.f)));
  }
  attn::hsa const policy{};
  auto run = [&](int i, cudaStream_t st) {
    context<gpu> ctx{reinterpret_cast<CUstream_st*>(st)};
    auto a = make_attention_args(q[i], k[i], v[i], o[i], 1, n, heads, dim);
    std::size_t const bytes = attention_workspace_bytes(ctx, policy, a);
    void* ws = nullptr;  // stream-ordered, on this thread's stream (what a Thrust vector does not do)
    DRDIFF_CUDA_CHECK(cudaMallocAsync(&ws, std::max<std::size_t>(bytes, 1), st));
    attention(ctx, policy, a, ws, bytes);
    DRDIFF_CUDA_CHECK(cudaFreeAsync(ws, st));
    DRDIFF_CUDA_CHECK(cudaStreamSynchronize(st));
  };
  std::vector<std::vector<__nv_bfloat16>> seq(4);
  for (int i = 0; i < 4; ++i) {
    run(i, nullptr);
    seq[i] = host_copy(o[i], elems);
    DRDIFF_CUDA_CHECK(cudaMemset(o[i], 0xff, elems * sizeof(__nv_bfloat16)));  // NaN bits: unwritten shows
  }
  test::four_at_once([&](int i) {
    cudaStream_t st = nullptr;
    DRDIFF_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    run(i, st);
    DRDIFF_CUDA_CHECK(cudaStreamDestroy(st));
  });
  for (int i = 0; i < 4; ++i) CHECK(same_bits(host_copy(o[i], elems), seq[i]));
}

TEST_CASE("the CUDA model forward from 4 threads (own stream and model each) equals sequential calls",
          "[core][threads][model][cuda]") {
  unsigned const seed = std::random_device{}();
  INFO("seed " << seed);
  auto cfg = presets::tiny();
  cfg.output = prediction::categorical;
  model<cpu, model_config<>> host(cfg);
  host.init_random(seed % 1000);
  int const n = 1500, de = cfg.sizes.embed_dim;
  std::size_t const sz = std::size_t(n) * de;
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd;
  std::list<thrust::device_vector<float>> store;
  std::vector<float*> xt(4), x0(4);
  for (int i = 0; i < 4; ++i) {
    std::vector<float> h(sz);
    for (auto& x : h) x = nd(rng);
    xt[i] = device_copy(store, h);
    x0[i] = device_copy(store, std::vector<float>(sz, 0.f));
  }
  std::vector<std::vector<float>> seq(4), par(4);
  {
    model<gpu, model_config<>> g(cfg, host.weights());
    for (int i = 0; i < 4; ++i) {
      g.forward(context<gpu>{}, xt[i], 0.3 + 0.1 * i, x0[i], 1, n);
      DRDIFF_CUDA_CHECK(cudaDeviceSynchronize());
      seq[i] = host_copy(x0[i], sz);
    }
  }
  test::four_at_once([&](int i) {
    cudaStream_t st = nullptr;
    DRDIFF_CUDA_CHECK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    {
      model<gpu, model_config<>> g(cfg, host.weights());
      g.forward(context<gpu>{reinterpret_cast<CUstream_st*>(st)}, xt[i], 0.3 + 0.1 * i, x0[i], 1, n);
      DRDIFF_CUDA_CHECK(cudaStreamSynchronize(st));
      par[i] = host_copy(x0[i], sz);
    }
    DRDIFF_CUDA_CHECK(cudaStreamDestroy(st));
  });
  for (int i = 0; i < 4; ++i) CHECK(par[i] == seq[i]);
}
