#pragma once
/// \file
/// Reading the files a model is made of (weights, config.json, tokenizer files) as untrusted input:
/// a path that is not a regular readable file — a directory, a FIFO, a device, a socket, a missing
/// or unreadable file — is a drdiff::error naming the path, checked before any read, so that no read
/// blocks on a FIFO and no size is taken of a directory. Writing goes through a temporary file and a
/// rename, so a failed save never leaves a truncated file. POSIX (stat, open, mkstemp, rename).

#include <drdiff/core/error.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// What `path` is, in words, when it is not a regular file ("" when it is one).
inline std::string not_regular_reason(std::string const& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::strerror(errno);
  if (S_ISDIR(st.st_mode)) return "it is a directory, not a file";
  if (S_ISFIFO(st.st_mode)) return "it is a FIFO (named pipe), not a regular file";
  if (S_ISCHR(st.st_mode) || S_ISBLK(st.st_mode)) return "it is a device, not a regular file";
  if (S_ISSOCK(st.st_mode)) return "it is a socket, not a regular file";
  if (!S_ISREG(st.st_mode)) return "it is not a regular file";
  return "";
}

/// Throws unless `path` is a regular file that can be opened for reading; `who` prefixes the message.
inline void check_regular_file(std::string const& path, char const* who) {
  DRDIFF_CHECK(!path.empty(), who, ": the file name is empty");
  std::string const why = not_regular_reason(path);
  DRDIFF_CHECK(why.empty(), who, ": cannot open '", path, "': ", why);
  std::ifstream in(path, std::ios::binary);
  DRDIFF_CHECK(in.good(), who, ": cannot open '", path, "' for reading: ", std::strerror(errno));
}

/// The whole of a regular file, with at most `limit` bytes (a larger file is refused by name).
inline std::vector<std::uint8_t> read_regular_file(std::string const& path, char const* who,
                                                   std::uint64_t limit = std::uint64_t(1) << 40) {
  check_regular_file(path, who);
  std::ifstream in(path, std::ios::binary);
  in.seekg(0, std::ios::end);
  std::streamoff const size = in.tellg();
  DRDIFF_CHECK(size >= 0, who, ": cannot size '", path, "'");
  DRDIFF_CHECK(std::uint64_t(size) <= limit, who, ": '", path, "' is ", size, " bytes, above the limit of ", limit);
  in.seekg(0, std::ios::beg);
  std::vector<std::uint8_t> b(static_cast<std::size_t>(size));
  if (size > 0) in.read(reinterpret_cast<char*>(b.data()), size);
  DRDIFF_CHECK(in.good() || size == 0, who, ": cannot read '", path, "'");
  return b;
}

/// Writes `bytes` to `path` so that an interrupted or failed write never leaves a truncated file
/// there: the bytes go to a temporary file in the same folder (mkstemp), which is flushed (fsync) and
/// then renamed over `path`; on any failure the temporary file is removed and the error names the path.
inline void write_file_atomically(std::string const& path, std::uint8_t const* bytes, std::size_t n,
                                  char const* who) {
  DRDIFF_CHECK(!path.empty(), who, ": the file name is empty");
  std::string tmpl = path + ".tmp-XXXXXX";
  int const fd = ::mkstemp(&tmpl[0]);
  DRDIFF_CHECK(fd >= 0, who, ": cannot create a temporary file next to '", path, "': ", std::strerror(errno));
  std::string const tmp = tmpl;
  auto fail = [&](char const* what) {
    int const e = errno;
    ::close(fd);
    ::unlink(tmp.c_str());
    DRDIFF_FAIL(who, ": ", what, " '", path, "' failed: ", std::strerror(e), " (the file was left as it was)");
  };
  std::size_t done = 0;
  while (done < n) {
    ssize_t const w = ::write(fd, bytes + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) fail("writing");
    done += std::size_t(w);
  }
  if (::fsync(fd) != 0) fail("flushing");
  ::fchmod(fd, 0644);
  if (::close(fd) != 0) {
    int const e = errno;
    ::unlink(tmp.c_str());
    DRDIFF_FAIL(who, ": closing '", path, "' failed: ", std::strerror(e), " (the file was left as it was)");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int const e = errno;
    ::unlink(tmp.c_str());
    DRDIFF_FAIL(who, ": cannot rename the temporary file to '", path, "': ", std::strerror(e));
  }
}

}  // namespace detail
DRDIFF_NAMESPACE_END
