#pragma once
/// \file
/// Reading the files a model is made of (weights, config.json, tokenizer files) as untrusted input:
/// a path that is not a regular readable file — a directory, a FIFO, a device, a socket, a missing
/// or unreadable file — is a drdiff::error naming the path, checked before any read, so that no read
/// blocks on a FIFO and no size is taken of a directory. Writing goes through a temporary file and a
/// rename, so a failed save never leaves a truncated file. POSIX (stat, open, fsync, rename).

#include <drdiff/core/error.hpp>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <new>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// What a file of mode `mode` is, in words, when it is not a regular file ("" when it is one).
inline std::string kind_reason(mode_t mode) {
  if (S_ISDIR(mode)) return "it is a directory, not a file";
  if (S_ISFIFO(mode)) return "it is a FIFO (named pipe), not a regular file";
  if (S_ISCHR(mode) || S_ISBLK(mode)) return "it is a device, not a regular file";
  if (S_ISSOCK(mode)) return "it is a socket, not a regular file";
  if (!S_ISREG(mode)) return "it is not a regular file";
  return "";
}

/// What `path` is, in words, when it is not a regular file ("" when it is one).
inline std::string not_regular_reason(std::string const& path) {
  struct stat st {};
  if (::stat(path.c_str(), &st) != 0) return std::strerror(errno);
  return kind_reason(st.st_mode);
}

/// A file descriptor closed when it goes out of scope (every error path of the functions below).
class unique_fd {
 public:
  explicit unique_fd(int fd) noexcept : fd_(fd) {}
  unique_fd(unique_fd&& o) noexcept : fd_(o.fd_) { o.fd_ = -1; }
  unique_fd(unique_fd const&) = delete;
  unique_fd& operator=(unique_fd const&) = delete;
  ~unique_fd() {
    if (fd_ >= 0) ::close(fd_);
  }
  int get() const noexcept { return fd_; }
  /// Closes now and reports whether close succeeded (errno says why not).
  bool close() noexcept {
    int const fd = fd_;
    fd_ = -1;
    return fd < 0 || ::close(fd) == 0;
  }

 private:
  int fd_;
};

/// Opens `path` for reading as a regular file: O_NONBLOCK (a FIFO put in its place cannot block the
/// open) and O_CLOEXEC, then fstat on the descriptor itself, so nothing can change between the check
/// and the read. Throws with `who`, the path and the reason.
inline unique_fd open_regular_file(std::string const& path, char const* who, struct stat* st) {
  DRDIFF_CHECK(!path.empty(), who, ": the file name is empty");
  unique_fd fd(::open(path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
  DRDIFF_CHECK(fd.get() >= 0, who, ": cannot open '", path, "': ", std::strerror(errno));
  std::string const why = ::fstat(fd.get(), st) != 0 ? std::strerror(errno) : kind_reason(st->st_mode);
  DRDIFF_CHECK(why.empty(), who, ": cannot open '", path, "': ", why);
  return fd;
}

/// Throws unless `path` is a regular file that can be opened for reading; `who` prefixes the message.
inline void check_regular_file(std::string const& path, char const* who) {
  struct stat st {};
  open_regular_file(path, who, &st);
}

/// True when `path` is a directory.
inline bool is_directory(std::string const& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

/// The whole of a regular file, with at most `limit` bytes (a larger file is refused by name).
inline std::vector<std::uint8_t> read_regular_file(std::string const& path, char const* who,
                                                   std::uint64_t limit = std::uint64_t(1) << 40) {
  struct stat st {};
  unique_fd const fd = open_regular_file(path, who, &st);
  std::uint64_t const size = std::uint64_t(st.st_size);
  DRDIFF_CHECK(size <= limit, who, ": '", path, "' is ", size, " bytes, above the limit of ", limit);
  std::vector<std::uint8_t> b;
  try {
    b.resize(static_cast<std::size_t>(size));
  } catch (std::bad_alloc const&) {
    DRDIFF_FAIL(who, ": '", path, "' is ", size, " bytes: not enough memory to read it");
  }
  for (std::size_t done = 0; done < b.size();) {
    ssize_t const r = ::read(fd.get(), b.data() + done, b.size() - done);
    if (r < 0 && errno == EINTR) continue;
    DRDIFF_CHECK(r > 0, who, ": cannot read '", path, "': ", r == 0 ? "it is shorter than its size" : std::strerror(errno));
    done += std::size_t(r);
  }
  return b;
}

/// Writes `bytes` to `path` so that an interrupted or failed write never leaves a truncated file
/// there: the bytes go to a temporary file in the same folder, which is flushed (fsync) and
/// then renamed over `path`; on any failure the temporary file is removed and the error names the path.
/// A symbolic link at `path` is replaced by the file, not written through.
inline void write_file_atomically(std::string const& path, std::uint8_t const* bytes, std::size_t n,
                                  char const* who) {
  DRDIFF_CHECK(!path.empty(), who, ": the file name is empty");
  // A fresh name next to the target, created with 0666 so that the umask applies as for any new file.
  static std::atomic<unsigned> counter{0};
  std::string tmp;
  int raw = -1;
  for (int attempt = 0; attempt < 100 && raw < 0; ++attempt) {
    tmp = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter.fetch_add(1));
    raw = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (raw < 0 && errno != EEXIST) break;
  }
  DRDIFF_CHECK(raw >= 0, who, ": cannot create a temporary file next to '", path, "': ", std::strerror(errno));
  unique_fd fd(raw);
  // Until the rename, any failure removes the temporary file and leaves `path` as it was.
  auto check = [&](bool ok, char const* what) {
    if (ok) return;
    int const e = errno;
    fd.close();
    ::unlink(tmp.c_str());
    DRDIFF_FAIL(who, ": ", what, " '", path, "' failed: ", std::strerror(e), " (the file was left as it was)");
  };
  for (std::size_t done = 0; done < n;) {
    ssize_t const w = ::write(fd.get(), bytes + done, n - done);
    if (w < 0 && errno == EINTR) continue;
    if (w == 0) errno = EIO;
    check(w > 0, "writing");
    done += std::size_t(w);
  }
  check(::fsync(fd.get()) == 0, "flushing");
  // The file keeps the mode of the one it replaces (a new one has 0666 less the umask, from open).
  struct stat old {};
  if (::stat(path.c_str(), &old) == 0 && S_ISREG(old.st_mode)) check(::fchmod(fd.get(), old.st_mode & 07777) == 0,
                                                                     "setting the mode of");
  check(fd.close(), "closing");
  check(::rename(tmp.c_str(), path.c_str()) == 0, "renaming the temporary file to");
}

}  // namespace detail
DRDIFF_NAMESPACE_END
