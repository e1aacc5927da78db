// libFuzzer target for the safetensors reader: any input either parses (and every tensor then
// converts) or throws drdiff::error; anything else (a crash, a sanitizer report, another exception)
// is a bug. Built and run by scripts/fuzz.sh with clang's -fsanitize=fuzzer,address,undefined.

#include <drdiff/model/safetensors.hpp>

#include <cstddef>
#include <cstdint>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  using namespace drdiff::safetensors;
  try {
    auto const f = file::parse(std::vector<std::uint8_t>(data, data + size));
    std::vector<float> out;
    for (auto const& t : f.tensors()) {
      if (t.type != dtype::f32 && t.type != dtype::f16 && t.type != dtype::bf16) continue;
      if (t.elements() > (1 << 20)) continue;
      out.resize(std::size_t(t.elements()));
      f.convert(t, out.data());
    }
    for (auto const& kv : f.metadata()) (void)kv;
  } catch (drdiff::error const&) {
  }
  return 0;
}
