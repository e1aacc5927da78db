// libFuzzer target for the JSON vocabulary tokenizer: any input either gives a vocabulary (which
// then encodes and decodes its own first bytes) or throws drdiff::error. Built and run by
// scripts/fuzz.sh.

#include <drdiff/model/vocab_tokenizer.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::string const text(reinterpret_cast<char const*>(data), size);
  try {
    auto const v = drdiff::vocab_tokenizer::from_json(text);
    auto const ids = v.encode(text.substr(0, 64));
    (void)v.decode(ids);
  } catch (drdiff::error const&) {
  }
  return 0;
}
