// libFuzzer target for a model directory's config.json: any input either gives a configuration that
// validates or throws drdiff::error; anything else (a crash, a sanitizer report, another exception,
// nlohmann's own among them) is a bug. Built and run by scripts/fuzz.sh.

#include <drdiff/model/directory.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  try {
    auto const d = drdiff::model_directory::from_json(std::string(reinterpret_cast<char const*>(data), size));
    d.config.validate();
    for (int n : {1, 1000, 5000, 1 << 20})
      if (n <= d.config.attention.tiers[d.config.attention.num_tiers - 1].max_len)
        d.config.attention.validate(n, d.config.sizes.heads);
  } catch (drdiff::error const&) {
  }
  return 0;
}
