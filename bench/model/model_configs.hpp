#pragma once
// The end-to-end benchmark's two models (shared/notes/end_to_end.md): DrDiff (HSA attention, 8
// experts top-2, DPM-Solver++ 2M in 10 steps) and the dense baseline of equal active parameters
// (dense attention, one dense FFN of k·d_ff, DDIM in 25 steps); plus a fast deterministic weight fill
// for large presets (seeded uniform of the spec's standard deviation; norms 1, biases 0).

#include <drdiff/model/config.hpp>
#include <drdiff/model/weights.hpp>

#include <cmath>
#include <cstdint>

namespace drdiff::bench {

inline model_config<> drdiff_config(model_config<> c) {
  c.solver.order = 2;
  c.steps = 10;
  return c;
}
inline model_config<attn::dense> dense_config(model_config<> const& c) {
  model_config<attn::dense> d;
  d.sizes = c.sizes;
  d.sizes.d_ff = c.sizes.d_ff * c.router.k;  // the same active FFN parameters
  d.sizes.experts = 1;
  d.router.k = 1;
  d.solver.order = 1;  // DDIM
  d.steps = 25;
  return d;
}

inline void fast_fill(model_weights& w, std::uint64_t seed) {
  for (auto const& s : w.specs()) {
    auto& t = w.tensor(s.name);
    std::uint64_t x = seed ^ (std::hash<std::string>{}(s.name) * 0x9e3779b97f4a7c15ull);
    double const a = s.stddev * std::sqrt(3.0);  // uniform(−a, a) has the spec's variance
    for (auto& v : t) {
      x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
      double const u = double((x * 0x2545f4914f6cdd1dull) >> 11) * (1.0 / 9007199254740992.0);
      v = s.how == parameter_spec::init::ones ? 1.f : s.how == parameter_spec::init::zeros ? 0.f : float(a * (2 * u - 1));
    }
  }
}

}  // namespace drdiff::bench
