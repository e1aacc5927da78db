#pragma once
/// \file
/// A counter-based Gaussian noise source: z(step, i) is a pure function of (seed, step, i), so the
/// CPU and the GPU draw the same numbers and a run is reproducible for a seed whatever the
/// threading. SplitMix64 mixing + Box–Muller.

#include <drdiff/core/config.hpp>

#include <cmath>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace solver {

struct gaussian_noise {
  std::uint64_t seed = 0;

  DRDIFF_HOST_DEVICE static constexpr std::uint64_t mix(std::uint64_t x) noexcept {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
  }
  /// The two standard normal values for indices 2j and 2j + 1 of `step` (one Box–Muller draw).
  DRDIFF_HOST_DEVICE void pair(int step, std::uint64_t j, double& z0, double& z1) const noexcept {
    std::uint64_t const k = mix(seed ^ mix(std::uint64_t(step) * 0x632be59bd9b4e019ull + j));
    std::uint64_t const k2 = mix(k);
    double const u1 = (double(k >> 11) + 0.5) * (1.0 / 9007199254740992.0);  // (0, 1)
    double const u2 = double(k2 >> 11) * (1.0 / 9007199254740992.0);
    double const r = sqrt(-2.0 * log(u1));
    double const a = 6.283185307179586 * u2;
    z0 = r * cos(a);
    z1 = r * sin(a);
  }
  /// A standard normal value for (step, i).
  DRDIFF_HOST_DEVICE double operator()(int step, std::uint64_t i) const noexcept {
    double z0 = 0, z1 = 0;
    pair(step, i >> 1, z0, z1);
    return (i & 1) ? z1 : z0;
  }
};

}  // namespace solver
DRDIFF_NAMESPACE_END
