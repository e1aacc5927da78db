#pragma once
/// \file
/// drdiff::model<Backend, Config>: the DrDiff denoiser assembled from the library's parts (see
/// model/config.hpp for the network). This header declares the type and what the backends share:
/// the per-component timing and the generation settings and result. The CPU model is in
/// <drdiff/cpu/model.hpp>.

#include <drdiff/core/backend.hpp>
#include <drdiff/model/config.hpp>

#include <cstdint>
#include <functional>
#include <string>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

template <class Backend, class Config>
class model {
  static_assert(!std::is_same_v<Backend, Backend>,
                "drdiff::model: no implementation for this backend. For drdiff::cpu include <drdiff/cpu/model.hpp>.");
};

/// Wall-clock seconds spent per component (accumulated over calls; reset by the caller).
struct model_timing {
  double attention = 0, moe = 0, dense = 0, solver = 0, rounding = 0;
  double total() const noexcept { return attention + moe + dense + solver + rounding; }
};

/// What to generate: `length` new tokens after the prompt, from the noise of `seed`.
struct generation_request {
  std::vector<int> prompt;  ///< token ids kept clean (DiffuSeq-style conditioning)
  int length = 64;
  std::uint64_t seed = 0;
  /// Called after each solver step with (step + 1, steps); may be empty.
  std::function<void(int, int)> progress;
};

struct generation_result {
  std::vector<int> tokens;  ///< the generated tokens (without the prompt)
  int steps = 0, evaluations = 0;
  double seconds = 0;
  model_timing timing{};
};

DRDIFF_NAMESPACE_END
