#pragma once
/// \file
/// Backend tags and their run-time contexts. CPU-safe: no CUDA header is needed.

#include <drdiff/core/config.hpp>

#include <type_traits>

struct CUstream_st;    // what cudaStream_t points to
struct cublasContext;  // what cublasHandle_t points to

DRDIFF_NAMESPACE_BEGIN

/// Backend tags: empty types, used only as template arguments.
struct cpu {};
struct cuda {};

template <class B>
inline constexpr bool is_backend_v = std::is_same_v<B, cpu> || std::is_same_v<B, cuda>;

/// Run-time state of a backend.
template <class B>
struct context;

/// CPU context: `num_threads` worker threads (0 = std::thread::hardware_concurrency()).
template <>
struct context<cpu> {
  using backend_type = cpu;
  int num_threads = 0;
};

/// CUDA context: the stream to launch on, the device it belongs to (-1 = current device), and the
/// caller's cuBLAS handle for the calls that run GEMMs (the MoE, the anchor projectors and rounding;
/// its stream is set to `stream` by each call). A call that needs the handle refuses a null one; one
/// handle per thread (cuBLAS handles are not shared between concurrent calls).
template <>
struct context<cuda> {
  using backend_type = cuda;
  CUstream_st* stream = nullptr;
  int device = -1;
  cublasContext* cublas = nullptr;
};

DRDIFF_NAMESPACE_END
