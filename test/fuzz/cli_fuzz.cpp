// libFuzzer target for drdiff-generate's command line (examples/generate_cli.hpp, on CLI11): the
// input is split at newlines into up to 32 arguments; parsing either succeeds (and then the options
// hold values their checks allow) or throws CLI11's parse error. Anything else is a bug. Built and
// run by scripts/fuzz.sh.

#include "generate_cli.hpp"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(std::uint8_t const* data, std::size_t size) {
  std::vector<std::string> args{"drdiff-generate"};
  std::string cur;
  for (std::size_t i = 0; i < size && args.size() < 33; ++i) {
    char const c = char(data[i]);
    if (c == '\n') {
      args.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (args.size() < 33) args.push_back(cur);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  drdiff::examples::generate::options o;
  CLI::App app{"fuzz", "drdiff-generate"};
  drdiff::examples::generate::add_options(app, o);
  try {
    app.parse(int(argv.size()), argv.data());
  } catch (CLI::Error const&) {
    return 0;
  }
  // Parsed: the checks held.
  if (o.length < 1 || o.length > (1 << 20) || o.steps < 0 || o.steps > 1000 || o.threads < 0) std::abort();
  if (o.preset != "tiny" && o.preset != "small" && o.preset != "base") std::abort();
  if (o.backend != "cpu" && o.backend != "cuda") std::abort();
  if (!o.solver.empty() && o.solver != "ddim" && o.solver != "2m" && o.solver != "3m") std::abort();
  (void)drdiff::examples::generate::conflicts(o);
  return 0;
}
