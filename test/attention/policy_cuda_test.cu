// The same policy objects on the GPU: masks and segment enumeration evaluated in device code
// agree with the host, pair by pair.

#include <drdiff/cuda.cuh>

#include <catch2/catch.hpp>

#include <climits>
#include <vector>

#include <thrust/device_vector.h>

using namespace drdiff;

namespace {

__global__ void mask_kernel(attn::pattern p, unsigned char* out) {
  int const i = blockIdx.x, n = p.n;
  for (int j = threadIdx.x; j < n; j += blockDim.x) out[std::size_t(i) * n + j] = p.mask(i, j) ? 1 : 0;
}

struct count_pairs {
  attn::tiled_pattern const* p;
  int pass;
  attn::index_range rows;
  unsigned* counts;
  __device__ void operator()(attn::index_range keys, bool exact) const {
    for (int c = 0; c < keys.count; ++c)
      for (int r = 0; r < rows.count; ++r) {
        int const i = rows[r], j = keys[c];
        bool const own = p->owns(pass, i, j);
        if (own || exact) atomicAdd(counts + std::size_t(i) * p->n + j, own ? 1u : 1000u);
      }
  }
};

// One thread per (pass, tile): enumerates the tile's segments on the device.
__global__ void enumerate_kernel(attn::tiled_pattern p, int pass, unsigned* counts) {
  int const t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= p.num_q_tiles(pass)) return;
  p.for_each_segment(pass, t, count_pairs{&p, pass, p.q_tile(pass, t), counts});
}

template <class T>
struct device_buffer {
  thrust::device_vector<T> v;  // zero-filled, owned by Thrust
  T* ptr;
  explicit device_buffer(std::size_t n) : v(n), ptr(thrust::raw_pointer_cast(v.data())) {}
};

}  // namespace

TEST_CASE("policies evaluate identically in device code", "[attention][policy][cuda]") {
  attn::hsa_tier const tiers[] = {
      {64, true, 0, 1, 0, {}, nullptr},
      {400, false, 16, 3, 64, attn::global_tokens::first_sqrt(8).spec, nullptr},
      {INT_MAX, false, 24, 8, 200, attn::global_tokens::strided(9).spec, nullptr},
  };
  auto const h = attn::hsa::from_tiers(tiers);
  for (int n : {50, 333, 777}) {
    attn::tiled_pattern const p = h.bind(n, 0).tiles(64);
    INFO("N = " << n);
    device_buffer<unsigned char> d_mask(std::size_t(n) * n);
    mask_kernel<<<n, 128>>>(p, d_mask.ptr);
    DRDIFF_CUDA_CHECK(cudaGetLastError());
    std::vector<unsigned char> mask(std::size_t(n) * n);
    DRDIFF_CUDA_CHECK(cudaMemcpy(mask.data(), d_mask.ptr, mask.size(), cudaMemcpyDeviceToHost));

    device_buffer<unsigned> d_counts(std::size_t(n) * n);
    for (int pass = 0; pass < p.num_passes(); ++pass) {
      int const tiles = p.num_q_tiles(pass);
      enumerate_kernel<<<(tiles + 63) / 64, 64>>>(p, pass, d_counts.ptr);
      DRDIFF_CUDA_CHECK(cudaGetLastError());
    }
    std::vector<unsigned> counts(std::size_t(n) * n);
    DRDIFF_CUDA_CHECK(cudaMemcpy(counts.data(), d_counts.ptr, counts.size() * sizeof(unsigned),
                                 cudaMemcpyDeviceToHost));
    std::size_t bad_mask = 0, bad_count = 0;
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) {
        bool const m = p.mask(i, j);
        bad_mask += (mask[std::size_t(i) * n + j] != 0) != m;
        bad_count += counts[std::size_t(i) * n + j] != (m ? 1u : 0u);
      }
    REQUIRE(bad_mask == 0);
    REQUIRE(bad_count == 0);
  }
}

TEST_CASE("CUDA errors become drdiff::cuda_error naming the call", "[core][errors][cuda]") {
  void* p = nullptr;
  REQUIRE_THROWS_WITH([&] { DRDIFF_CUDA_CHECK(cudaMalloc(&p, std::size_t(1) << 62)); }(),
                      Catch::Matchers::Contains("cudaMalloc") && Catch::Matchers::Contains("cudaErrorMemoryAllocation"));
}
