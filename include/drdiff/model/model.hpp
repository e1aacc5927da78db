#pragma once
/// \file
/// drdiff::model<Backend, Config>: the DrDiff denoiser assembled from the library's parts (see
/// model/config.hpp for the network). This header declares the type and what the backends share:
/// the per-component timing and the generation settings and result. The CPU model is in
/// <drdiff/cpu/model.hpp>.

#include <drdiff/core/backend.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/model/config.hpp>

#include <algorithm>
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

namespace detail {

/// What both backends build before sampling: the request checked against the vocabulary, the
/// target flags (0 = prompt, kept clean) and the clean embeddings of the prompt positions.
struct generation_layout {
  int prompt = 0, tokens = 0;
  std::vector<unsigned char> target;
  std::vector<float> clean;

  generation_layout(generation_request const& req, int vocab, float const* embed, int dim)
      : prompt(int(req.prompt.size())), tokens(int(req.prompt.size()) + req.length) {
    DRDIFF_CHECK(req.length >= 1, "generate: length = ", req.length, " must be >= 1");
    for (std::size_t i = 0; i < req.prompt.size(); ++i)
      DRDIFF_CHECK(req.prompt[i] >= 0 && req.prompt[i] < vocab, "generate: prompt token ", i, " = ", req.prompt[i],
                   " is outside the vocabulary 0..", vocab - 1);
    target.assign(std::size_t(tokens), 1);
    clean.assign(std::size_t(tokens) * dim, 0.f);
    for (int i = 0; i < prompt; ++i) {
      target[std::size_t(i)] = 0;
      float const* row = embed + std::size_t(req.prompt[std::size_t(i)]) * dim;
      std::copy(row, row + dim, clean.begin() + std::ptrdiff_t(i) * dim);
    }
  }
};

}  // namespace detail

DRDIFF_NAMESPACE_END
