#pragma once
/// \file
/// The soft absorbing state of DiffuSeq-v2 (shared/notes/paper.md §5): a learned vector m that the
/// forward process noises toward, plus per-token replacement by m. Portable settings and the
/// per-element rule shared by both backends; cpu/anchor.hpp and cuda/anchor.cuh run it.
///
///   target positions:  x_t = √ᾱ·(x₀ − m) + √(1−ᾱ)·ε + m, and with probability p = √(1−ᾱ)·rate the
///                      whole token is replaced by m;
///   source positions:  x_t = x₀ (the prompt stays clean, DiffuSeq's partial noising).
///
/// ε and the replacement draws are counter-based (seed, stream, index), so the CPU and the GPU
/// produce the same numbers and a call is reproducible whatever the threading.

#include <drdiff/core/error.hpp>
#include <drdiff/solver/noise.hpp>

#include <cmath>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace anchor {

/// Tokens laid out as [batch, seq, dim], row-major and packed.
struct token_shape {
  int batch = 1, seq = 0, dim = 0;

  std::int64_t tokens() const noexcept { return std::int64_t(batch) * seq; }
  std::int64_t elements() const noexcept { return tokens() * dim; }
  void validate(char const* who) const {
    DRDIFF_CHECK(batch > 0, who, ": batch = ", batch, " must be > 0");
    DRDIFF_CHECK(seq > 0, who, ": seq = ", seq, " must be > 0");
    DRDIFF_CHECK(dim > 0, who, ": dim = ", dim, " must be > 0");
  }
};

/// Settings of the soft absorbing forward process.
struct soft_absorbing {
  double rate = 0.0;        ///< replacement scale: p = √(1−ᾱ)·rate per token (DiffuSeq-v2 uses 0.2..0.5)
  std::uint64_t seed = 0;   ///< with `stream`, picks the random numbers

  void validate() const {
    DRDIFF_CHECK(std::isfinite(rate) && rate >= 0.0 && rate <= 1.0, "soft_absorbing: rate = ", rate,
                 " must be in [0, 1]");
  }
};

/// One forward-noising call: x0 → xt for a batch of sequences, each with its own ᾱ.
template <class T>
struct absorb_args {
  token_shape shape{};
  T const* x0 = nullptr;                          ///< [batch, seq, dim] clean embeddings
  T const* maybe_m = nullptr;                     ///< [dim] absorbing state; null = the zero vector
  double const* alpha_bar = nullptr;              ///< [batch] ᾱ of each sequence, host memory, in [0, 1]
  unsigned char const* maybe_target = nullptr;    ///< [batch, seq]: 1 = noised, 0 = kept clean; null = all noised
  T* xt = nullptr;                                ///< [batch, seq, dim] output (may equal x0)
  std::uint64_t stream = 0;                       ///< e.g. the training step: each value gives fresh numbers

  void validate(soft_absorbing const& s) const {
    s.validate();
    shape.validate("absorb");
    DRDIFF_CHECK(x0 != nullptr, "absorb: x0 is a null pointer");
    DRDIFF_CHECK(xt != nullptr, "absorb: xt is a null pointer");
    DRDIFF_CHECK(alpha_bar != nullptr, "absorb: alpha_bar is a null pointer (one value per sequence)");
    for (int b = 0; b < shape.batch; ++b)
      DRDIFF_CHECK(std::isfinite(alpha_bar[b]) && alpha_bar[b] >= 0.0 && alpha_bar[b] <= 1.0, "absorb: alpha_bar[",
                   b, "] = ", alpha_bar[b], " must be in [0, 1]");
  }
};

namespace detail {

/// A uniform number in [0, 1) for (seed, stream, token): decides the token's replacement.
DRDIFF_HOST_DEVICE double replace_uniform(std::uint64_t seed, std::uint64_t stream, std::uint64_t token) noexcept {
  using g = solver::gaussian_noise;
  std::uint64_t const k = g::mix(g::mix(seed ^ 0x5851f42d4c957f2dull) ^ g::mix(stream * 0x2545f4914f6cdd1dull + token));
  return double(k >> 11) * (1.0 / 9007199254740992.0);
}

/// The Gaussian draws of a call: noise step = the low 31 bits of the stream (plus the seed mixing).
DRDIFF_HOST_DEVICE solver::gaussian_noise absorb_noise(soft_absorbing const& s, std::uint64_t stream) noexcept {
  return solver::gaussian_noise{solver::gaussian_noise::mix(s.seed ^ (stream * 0x9e3779b97f4a7c15ull))};
}

/// The rule for one element, in double: `replaced` says the token is absorbed; eps is its ε.
DRDIFF_HOST_DEVICE double absorb_value(double x0, double m, double alpha_bar, bool target, bool replaced,
                                       double eps) noexcept {
  if (!target) return x0;
  if (replaced) return m;
  return sqrt(alpha_bar) * (x0 - m) + sqrt(1.0 - alpha_bar) * eps + m;
}

/// Whether a target token is absorbed at ᾱ.
DRDIFF_HOST_DEVICE bool absorbed(soft_absorbing const& s, std::uint64_t stream, std::uint64_t token,
                                 double alpha_bar) noexcept {
  double const p = sqrt(1.0 - alpha_bar) * s.rate;
  return p > 0.0 && replace_uniform(s.seed, stream, token) < p;
}

}  // namespace detail
}  // namespace anchor
DRDIFF_NAMESPACE_END
