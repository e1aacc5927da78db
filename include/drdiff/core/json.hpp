#pragma once
/// \file
/// A strict cursor over JSON text for the safetensors header: whitespace, punctuation, and strings
/// with every escape, surrogate pairs and UTF-8 validation (no overlongs, no lone surrogates). Errors
/// are drdiff::error "<context> at byte N: ...". Never reads outside [text, text + size).
///
/// Kept by hand (config.json and vocabulary files use nlohmann-json): the safetensors loader is part
/// of drdiff::drdiff, which needs Eigen alone, and the header's rules are stricter than a general
/// parser's defaults: a duplicate key is an error (nlohmann keeps the last one silently), every error
/// names its byte position, and the reader is fuzzed as it stands (docs/weights.md).

#include <drdiff/core/error.hpp>

#include <cstddef>
#include <cstdint>
#include <string>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

class json_cursor {
 public:
  json_cursor(char const* text, std::size_t size, char const* context) : s_(text), n_(size), context_(context) {}

  std::size_t position() const noexcept { return i_; }
  bool at_end() const noexcept { return i_ >= n_; }

  int peek() const { return i_ < n_ ? static_cast<unsigned char>(s_[i_]) : -1; }
  void ws() {
    while (i_ < n_ && (s_[i_] == ' ' || s_[i_] == '\t' || s_[i_] == '\n' || s_[i_] == '\r')) ++i_;
  }
  [[noreturn]] void fail(char const* what) const { DRDIFF_FAIL(context_, " at byte ", i_, ": ", what); }
  void expect(char c, char const* what) {
    if (peek() != static_cast<unsigned char>(c)) fail(what);
    ++i_;
  }
  static void put_utf8(std::string& o, std::uint32_t c) {
    if (c < 0x80) {
      o += char(c);
    } else if (c < 0x800) {
      o += char(0xc0 | (c >> 6));
      o += char(0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
      o += char(0xe0 | (c >> 12));
      o += char(0x80 | ((c >> 6) & 0x3f));
      o += char(0x80 | (c & 0x3f));
    } else {
      o += char(0xf0 | (c >> 18));
      o += char(0x80 | ((c >> 12) & 0x3f));
      o += char(0x80 | ((c >> 6) & 0x3f));
      o += char(0x80 | (c & 0x3f));
    }
  }
  std::uint32_t hex4() {
    if (n_ - i_ < 4) fail("truncated \\u escape");
    std::uint32_t v = 0;
    for (int k = 0; k < 4; ++k) {
      char const c = s_[i_++];
      v <<= 4;
      if (c >= '0' && c <= '9') v |= std::uint32_t(c - '0');
      else if (c >= 'a' && c <= 'f') v |= std::uint32_t(c - 'a' + 10);
      else if (c >= 'A' && c <= 'F') v |= std::uint32_t(c - 'A' + 10);
      else fail("bad hex digit in a \\u escape");
    }
    return v;
  }
  /// One UTF-8 sequence starting at a byte ≥ 0x80, validated (no overlongs, no surrogates).
  void utf8(std::string& o) {
    unsigned char const c = static_cast<unsigned char>(s_[i_]);
    int len = 0;
    std::uint32_t cp = 0, min = 0;
    if (c >= 0xc2 && c <= 0xdf) len = 2, cp = c & 0x1f, min = 0x80;
    else if (c >= 0xe0 && c <= 0xef) len = 3, cp = c & 0x0f, min = 0x800;
    else if (c >= 0xf0 && c <= 0xf4) len = 4, cp = c & 0x07, min = 0x10000;
    else fail("invalid UTF-8");
    if (n_ - i_ < std::size_t(len)) fail("truncated UTF-8");
    for (int k = 1; k < len; ++k) {
      unsigned char const b = static_cast<unsigned char>(s_[i_ + k]);
      if ((b & 0xc0) != 0x80) fail("invalid UTF-8");
      cp = (cp << 6) | (b & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) fail("invalid UTF-8");
    o.append(s_ + i_, std::size_t(len));
    i_ += std::size_t(len);
  }
  std::string string() {
    expect('"', "expected a string");
    std::string o;
    for (;;) {
      if (i_ >= n_) fail("unterminated string");
      unsigned char const c = static_cast<unsigned char>(s_[i_]);
      if (c == '"') {
        ++i_;
        return o;
      }
      if (c < 0x20) fail("control character in a string");
      if (c >= 0x80) {
        utf8(o);
        continue;
      }
      ++i_;
      if (c != '\\') {
        o += char(c);
        continue;
      }
      if (i_ >= n_) fail("unterminated escape");
      char const e = s_[i_++];
      switch (e) {
        case '"': o += '"'; break;
        case '\\': o += '\\'; break;
        case '/': o += '/'; break;
        case 'b': o += '\b'; break;
        case 'f': o += '\f'; break;
        case 'n': o += '\n'; break;
        case 'r': o += '\r'; break;
        case 't': o += '\t'; break;
        case 'u': {
          std::uint32_t cp = hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) fail("lone low surrogate");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (n_ - i_ < 2 || s_[i_] != '\\' || s_[i_ + 1] != 'u') fail("lone high surrogate");
            i_ += 2;
            std::uint32_t const lo = hex4();
            if (lo < 0xdc00 || lo > 0xdfff) fail("bad low surrogate");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          put_utf8(o, cp);
          break;
        }
        default: fail("bad escape");
      }
    }
  }

 protected:
  char const* s_;
  std::size_t n_, i_ = 0;
  char const* context_;
};

}  // namespace detail
DRDIFF_NAMESPACE_END
