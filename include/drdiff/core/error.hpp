#pragma once
/// \file
/// drdiff::error and the host-side checking macros.

#include <drdiff/core/config.hpp>

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

DRDIFF_NAMESPACE_BEGIN

/// The one exception type of the library: bad arguments, unsupported shapes, backend failures.
/// The message names the parameter and the offending value.
class error : public std::runtime_error {
 public:
  explicit error(std::string const& what) : std::runtime_error(what) {}
};

namespace detail {
template <class... Args>
[[noreturn]] inline void fail(char const* file, int line, Args&&... args) {
  std::ostringstream os;
  os << "drdiff: ";
  (os << ... << std::forward<Args>(args));
  os << " [" << file << ":" << line << "]";
  throw error(os.str());
}
}  // namespace detail

DRDIFF_NAMESPACE_END

/// Always throws drdiff::error with the streamed arguments as its message.
#define DRDIFF_FAIL(...) ::drdiff::detail::fail(__FILE__, __LINE__, __VA_ARGS__)
/// Throws drdiff::error with the streamed arguments when `cond` is false.
#define DRDIFF_CHECK(cond, ...)    \
  do {                             \
    if (!(cond)) DRDIFF_FAIL(__VA_ARGS__); \
  } while (0)
