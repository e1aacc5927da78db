#pragma once
// Command-line parsing of the example programs, on CLI11 (Debian libcli11-dev): validators whose
// messages name the option and the bad value ("--length = 0 is outside 1..1048576", "--solver
// 'euler' is not ddim, 2m or 3m"), and one way out for bad arguments (the message and a pointer to
// --help, exit status 2) or --help (every option with its default, exit status 0).

#include <CLI/CLI.hpp>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <initializer_list>
#include <string>

namespace drdiff::examples {

/// An integer in [lo, hi]: "needs an integer, got 'x'" or "= v is outside lo..hi" otherwise.
inline CLI::Validator integer_in(long long lo, long long hi) {
  return CLI::Validator(
      [lo, hi](std::string& v) -> std::string {
        char* end = nullptr;
        errno = 0;
        long long const x = std::strtoll(v.c_str(), &end, 10);
        if (errno || end == v.c_str() || *end != '\0') return "needs an integer, got '" + v + "'";
        if (x < lo || x > hi) return "= " + v + " is outside " + std::to_string(lo) + ".." + std::to_string(hi);
        return {};
      },
      "INT in " + std::to_string(lo) + ".." + std::to_string(hi));
}

/// One of the listed words (or, with `allow_empty`, the empty string: "use the default"):
/// "'x' is not a, b or c" otherwise.
inline CLI::Validator one_of(std::initializer_list<char const*> words, bool allow_empty = false) {
  std::string list;
  std::size_t i = 0;
  for (char const* w : words) {
    list += (i == 0 ? "" : i + 1 == words.size() ? " or " : ", ");
    list += w;
    ++i;
  }
  std::vector<std::string> ws(words.begin(), words.end());
  return CLI::Validator(
      [ws, list, allow_empty](std::string& v) -> std::string {
        if (allow_empty && v.empty()) return {};
        for (auto const& w : ws)
          if (v == w) return {};
        return "'" + v + "' is not " + list;
      },
      list);
}

/// Parses; on bad arguments prints "<program>: <message>" and a pointer to --help and exits with 2,
/// on --help prints the options (with their defaults) and exits with 0.
inline void parse_or_exit(CLI::App& app, int argc, char** argv) {
  try {
    app.parse(argc, argv);
  } catch (CLI::CallForHelp const&) {
    std::fputs(app.help().c_str(), stdout);
    std::exit(0);
  } catch (CLI::ParseError const& e) {
    std::fprintf(stderr, "%s: %s\nRun with --help for the options.\n", app.get_name().c_str(), e.what());
    std::exit(2);
  }
}

/// The output file dir/name, open for writing; if it cannot be opened, prints "<program>: cannot write
/// dir/name" and exits with 1.
inline std::ofstream open_output_or_exit(CLI::App const& app, std::string const& dir, char const* name) {
  std::string const path = dir + "/" + name;
  std::ofstream out(path);
  if (!out) {
    std::fprintf(stderr, "%s: cannot write %s\n", app.get_name().c_str(), path.c_str());
    std::exit(1);
  }
  return out;
}

}  // namespace drdiff::examples
