#pragma once
/// \file
/// CUDA errors as drdiff::error: DRDIFF_CUDA_CHECK(expr) throws drdiff::cuda_error naming the call,
/// the error code and its description.

#include <drdiff/core/error.hpp>
#include <drdiff/cuda/config.cuh>

#include <cuda_runtime.h>

#include <sstream>
#include <string>

DRDIFF_NAMESPACE_BEGIN

/// A failed CUDA runtime call.
class cuda_error : public error {
 public:
  cuda_error(std::string const& what, cudaError_t code) : error(what), code_(code) {}
  cudaError_t code() const noexcept { return code_; }

 private:
  cudaError_t code_;
};

namespace detail {
[[noreturn]] inline void throw_cuda(cudaError_t code, char const* call, char const* file, int line) {
  std::ostringstream os;
  os << "drdiff: CUDA call " << call << " failed with " << cudaGetErrorName(code) << " (" << int(code)
     << "): " << cudaGetErrorString(code) << " [" << file << ":" << line << "]";
  throw cuda_error(os.str(), code);
}
}  // namespace detail

DRDIFF_NAMESPACE_END

#define DRDIFF_CUDA_CHECK(expr)                                                            \
  do {                                                                                     \
    cudaError_t const drdiff_status_ = (expr);                                             \
    if (drdiff_status_ != cudaSuccess) ::drdiff::detail::throw_cuda(drdiff_status_, #expr, __FILE__, __LINE__); \
  } while (0)
