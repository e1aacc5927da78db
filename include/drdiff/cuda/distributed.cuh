#pragma once
/// \file
/// The CUDA side of sequence-parallel attention: the element-wise steps of
/// drdiff::distributed_attention (attention/distributed_attention.hpp) as thrust::for_each_n over
/// the shared functors of attention/distributed_ops.hpp, on the context's stream; and the copies of
/// drdiff::cuda_thread_communicator, ranks that are threads of one process on one or several GPUs
/// (core/thread_comm.hpp: a test transport). The communicator over NCCL is <drdiff/cuda/nccl.cuh>
/// (an optional component: this header does not need NCCL).

#include <drdiff/attention/distributed_attention.hpp>
#include <drdiff/core/distributed.hpp>
#include <drdiff/core/thread_comm.hpp>
#include <drdiff/cuda/attention.cuh>
#include <drdiff/cuda/error.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/system/cuda/execution_policy.h>

#include <cstddef>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

template <>
struct dist_convert<float, __nv_bfloat16> {
  __host__ __device__ static float apply(__nv_bfloat16 x) { return __bfloat162float(x); }
};
template <>
struct dist_convert<__nv_bfloat16, float> {
  __host__ __device__ static __nv_bfloat16 apply(float x) { return __float2bfloat16(x); }
};
template <>
struct dist_convert<float, __half> {
  __host__ __device__ static float apply(__half x) { return __half2float(x); }
};
template <>
struct dist_convert<__half, float> {
  __host__ __device__ static __half apply(float x) { return __float2half(x); }
};

}  // namespace detail

/// Ranks that are threads of one process, with their data in device memory (any device: the copies
/// go peer to peer through unified addressing).
using cuda_thread_communicator = thread_communicator<drdiff::cuda>;

namespace detail {

template <>
struct thread_comm_memory<drdiff::cuda> {
  static void copy(context<drdiff::cuda> const& ctx, void* dst, void const* src, std::size_t bytes) {
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, ctx.stream));
  }
  static void to_host(context<drdiff::cuda> const& ctx, void* dst, void const* src, std::size_t bytes) {
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, ctx.stream));
    sync(ctx);
  }
  static void from_host(context<drdiff::cuda> const& ctx, void* dst, void const* src, std::size_t bytes) {
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, ctx.stream));
    sync(ctx);
  }
  static void sync(context<drdiff::cuda> const& ctx) { DRDIFF_CUDA_CHECK(cudaStreamSynchronize(ctx.stream)); }
};

template <>
struct dist_exec<drdiff::cuda> {
  static constexpr bool host_memory = false;
  /// The context's device becomes current (-1: keep the current one): every step after it launches there.
  static void enter(context<drdiff::cuda> const& ctx) {
    if (ctx.device >= 0) DRDIFF_CUDA_CHECK(cudaSetDevice(ctx.device));
  }

  template <class F>
  static void for_each(context<drdiff::cuda> const& ctx, F const& f) {
    std::int64_t const n = f.size();
    if (n <= 0) return;
    // A plain copy or weighing per element: Thrust's for_each is as fast as a hand-written loop here.
    thrust::for_each_n(thrust::cuda::par_nosync.on(ctx.stream), thrust::counting_iterator<std::int64_t>(0), n, f);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
  }
  static void zero(context<drdiff::cuda> const& ctx, void* p, std::size_t bytes) {
    if (bytes) DRDIFF_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, ctx.stream));
  }
  /// From pageable host memory: the call returns once `host` may be reused.
  static void upload(context<drdiff::cuda> const& ctx, void* dst, void const* host, std::size_t bytes) {
    if (bytes) DRDIFF_CUDA_CHECK(cudaMemcpyAsync(dst, host, bytes, cudaMemcpyHostToDevice, ctx.stream));
  }
  static void download(context<drdiff::cuda> const& ctx, void* host, void const* src, std::size_t bytes) {
    if (!bytes) return;
    DRDIFF_CUDA_CHECK(cudaMemcpyAsync(host, src, bytes, cudaMemcpyDeviceToHost, ctx.stream));
    DRDIFF_CUDA_CHECK(cudaStreamSynchronize(ctx.stream));
  }
  template <class Comm>
  static void agree(context<drdiff::cuda> const& ctx, Comm& comm, double* host, int count, void* scratch) {
    std::size_t const bytes = std::size_t(count) * sizeof(double);
    upload(ctx, scratch, host, bytes);
    comm.all_reduce(ctx, static_cast<double*>(scratch), std::size_t(count), reduction::max);
    download(ctx, host, scratch, bytes);
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
