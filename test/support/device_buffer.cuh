#pragma once
// Device memory and 16-bit conversions shared by the CUDA tests.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <vector>

#include <thrust/copy.h>
#include <thrust/device_vector.h>

namespace drdiff::test {

/// n elements of device memory, owned by Thrust (at least one, so ptr is never null).
template <class T>
struct dbuf {
  thrust::device_vector<T> v;
  T* ptr;
  std::size_t n;
  explicit dbuf(std::size_t count) : v(std::max<std::size_t>(1, count)), ptr(thrust::raw_pointer_cast(v.data())), n(count) {}
  dbuf(dbuf const&) = delete;
  void upload(std::vector<T> const& h) { thrust::copy(h.begin(), h.begin() + std::ptrdiff_t(n), v.begin()); }
  std::vector<T> download() const {
    std::vector<T> h(n);
    thrust::copy(v.begin(), v.begin() + std::ptrdiff_t(n), h.begin());
    return h;
  }
};

template <class T> T from_float(float x) { return T(x); }
template <> inline __nv_bfloat16 from_float(float x) { return __float2bfloat16(x); }
template <> inline __half from_float(float x) { return __float2half(x); }
template <class T> float to_float(T x) { return float(x); }
template <> inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <> inline float to_float(__half x) { return __half2float(x); }

}  // namespace drdiff::test
