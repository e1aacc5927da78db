#pragma once
/// \file
/// safetensors files (https://huggingface.co/docs/safetensors format): read, validated, converted, and
/// written. Portable C++17, no JSON library: a strict parser of exactly the format's schema.
///
/// Layout: 8 bytes little-endian header length N, N bytes of UTF-8 JSON, then the data buffer. The
/// header maps tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to
/// the data buffer) plus an optional "__metadata__" map of strings. The reader rejects, with a
/// drdiff::error naming the tensor and the problem: a file shorter than 8 bytes, a header length
/// beyond the file (or above 100 MB), bad JSON or UTF-8, an unknown field, dtype or duplicate name,
/// a negative or non-integer shape entry, a byte size that overflows or differs from the offsets,
/// offsets out of range, overlapping, or leaving holes in the buffer. Nothing is read out of bounds.
/// F32, F16 and BF16 tensors convert to float; other dtypes are recognised but not converted.

#include <drdiff/core/error.hpp>
#include <drdiff/core/file.hpp>
#include <drdiff/core/json.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <string>
#include <utility>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace safetensors {

enum class dtype { f64, f32, f16, bf16, i64, i32, i16, i8, u8, boolean, f8_e4m3, f8_e5m2 };

inline char const* name(dtype t) noexcept {
  switch (t) {
    case dtype::f64: return "F64";
    case dtype::f32: return "F32";
    case dtype::f16: return "F16";
    case dtype::bf16: return "BF16";
    case dtype::i64: return "I64";
    case dtype::i32: return "I32";
    case dtype::i16: return "I16";
    case dtype::i8: return "I8";
    case dtype::u8: return "U8";
    case dtype::boolean: return "BOOL";
    case dtype::f8_e4m3: return "F8_E4M3";
    default: return "F8_E5M2";
  }
}
inline std::size_t size_of(dtype t) noexcept {
  switch (t) {
    case dtype::f64: case dtype::i64: return 8;
    case dtype::f32: case dtype::i32: return 4;
    case dtype::f16: case dtype::bf16: case dtype::i16: return 2;
    default: return 1;
  }
}
inline bool parse_dtype(std::string const& s, dtype& out) noexcept {
  for (dtype t : {dtype::f64, dtype::f32, dtype::f16, dtype::bf16, dtype::i64, dtype::i32, dtype::i16, dtype::i8,
                  dtype::u8, dtype::boolean, dtype::f8_e4m3, dtype::f8_e5m2})
    if (s == name(t)) {
      out = t;
      return true;
    }
  return false;
}

// ---- 16-bit floats -------------------------------------------------------------------------------

inline float bf16_to_float(std::uint16_t h) noexcept {
  std::uint32_t const u = std::uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
/// Round to nearest even; NaN stays NaN.
inline std::uint16_t float_to_bf16(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return std::uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return std::uint16_t(u >> 16);
}
inline float f16_to_float(std::uint16_t h) noexcept {
  std::uint32_t const sign = std::uint32_t(h & 0x8000u) << 16;
  std::uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
  if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((man & 0x400u) == 0) {
        man <<= 1;
        --exp;
      }
      u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (man << 13);
  } else {
    u = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
/// Round to nearest even, overflow to infinity, subnormals kept.
inline std::uint16_t float_to_f16(float f) noexcept {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  std::uint32_t const sign = (u >> 16) & 0x8000u;
  std::uint32_t const a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return std::uint16_t(sign | 0x7e00u);  // NaN
  if (a >= 0x477ff000u) return std::uint16_t(sign | 0x7c00u);  // ≥ 65520 rounds to infinity
  if (a < 0x38800000u) {  // below the smallest normal half: subnormal or zero
    if (a < 0x33000000u) return std::uint16_t(sign);  // < 2^-25 rounds to 0
    std::uint32_t const e = a >> 23, m = (a & 0x7fffffu) | 0x800000u;
    int const shift = int(126 - e);  // m · 2^(e−150) in units of 2^−24: m >> (126 − e)
    std::uint32_t r = m >> shift;
    std::uint32_t const rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1u))) ++r;
    return std::uint16_t(sign | r);
  }
  std::uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the 13 dropped bits to nearest even
  return std::uint16_t(sign | ((r - 0x38000000u) >> 13));
}

// ---- reading -------------------------------------------------------------------------------------

struct tensor_info {
  std::string name;
  dtype type = dtype::f32;
  std::vector<std::int64_t> shape;
  std::uint64_t begin = 0, end = 0;  ///< byte offsets in the data buffer

  std::int64_t elements() const noexcept {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

inline std::string shape_string(std::vector<std::int64_t> const& s) {
  std::string r = "[";
  for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
  return r + "]";
}

namespace detail {

/// A strict parser of the safetensors header schema over [p, end).
class header_parser : drdiff::detail::json_cursor {
 public:
  header_parser(char const* p, std::size_t n) : drdiff::detail::json_cursor(p, n, "safetensors: bad header JSON") {}

  void parse(std::vector<tensor_info>& out, std::map<std::string, std::string>& meta) {
    ws();
    expect('{', "the header must be a JSON object");
    ws();
    if (peek() == '}') {
      ++i_;
    } else {
      for (;;) {
        ws();
        std::string const key = string();
        ws();
        expect(':', "expected ':' after a key");
        ws();
        if (key == "__metadata__") {
          DRDIFF_CHECK(!seen_meta_, "safetensors: duplicate __metadata__");
          seen_meta_ = true;
          metadata(meta);
        } else {
          for (auto const& t : out) DRDIFF_CHECK(t.name != key, "safetensors: duplicate tensor '", key, "'");
          out.push_back(tensor(key));
        }
        ws();
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect('}', "expected ',' or '}' in the header object");
        break;
      }
    }
    ws();
    DRDIFF_CHECK(i_ == n_, "safetensors: unexpected bytes after the header object at header byte ", i_);
  }

 private:
  bool seen_meta_ = false;

  std::uint64_t integer(std::string const& tensor, char const* field) {
    if (peek() == '-')
      DRDIFF_FAIL("safetensors: tensor '", tensor, "': ", field, " has a negative entry (header byte ", i_, ")");
    if (peek() < '0' || peek() > '9')
      DRDIFF_FAIL("safetensors: tensor '", tensor, "': ", field, " entries must be integers (header byte ", i_, ")");
    std::uint64_t v = 0;
    while (peek() >= '0' && peek() <= '9') {
      std::uint64_t const d = std::uint64_t(s_[i_++] - '0');
      DRDIFF_CHECK(v <= (std::numeric_limits<std::uint64_t>::max() - d) / 10, "safetensors: tensor '", tensor, "': ",
                   field, " entry overflows 64 bits");
      v = v * 10 + d;
    }
    if (peek() == '.' || peek() == 'e' || peek() == 'E')
      DRDIFF_FAIL("safetensors: tensor '", tensor, "': ", field, " entries must be integers (header byte ", i_, ")");
    return v;
  }
  std::vector<std::uint64_t> int_array(std::string const& tensor, char const* field) {
    expect('[', "expected an array");
    std::vector<std::uint64_t> v;
    ws();
    if (peek() == ']') {
      ++i_;
      return v;
    }
    for (;;) {
      ws();
      v.push_back(integer(tensor, field));
      DRDIFF_CHECK(v.size() <= 64, "safetensors: tensor '", tensor, "': ", field, " has more than 64 entries");
      ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect(']', "expected ',' or ']' in an array");
      return v;
    }
  }
  void metadata(std::map<std::string, std::string>& meta) {
    expect('{', "__metadata__ must be an object of strings");
    ws();
    if (peek() == '}') {
      ++i_;
      return;
    }
    for (;;) {
      ws();
      std::string k = string();
      ws();
      expect(':', "expected ':' in __metadata__");
      ws();
      if (peek() != '"') fail("__metadata__ values must be strings");
      std::string v = string();
      DRDIFF_CHECK(meta.count(k) == 0, "safetensors: duplicate __metadata__ key '", k, "'");
      meta.emplace(std::move(k), std::move(v));
      ws();
      if (peek() == ',') {
        ++i_;
        continue;
      }
      expect('}', "expected ',' or '}' in __metadata__");
      return;
    }
  }
  tensor_info tensor(std::string const& name) {
    tensor_info t;
    t.name = name;
    if (peek() != '{') DRDIFF_FAIL("safetensors: tensor '", name, "': its entry must be an object (header byte ", i_, ")");
    ++i_;
    bool has_dtype = false, has_shape = false, has_offsets = false;
    ws();
    if (peek() != '}') {
      for (;;) {
        ws();
        std::string const key = string();
        ws();
        expect(':', "expected ':' in a tensor entry");
        ws();
        if (key == "dtype") {
          DRDIFF_CHECK(!has_dtype, "safetensors: tensor '", name, "': duplicate dtype");
          has_dtype = true;
          if (peek() != '"') DRDIFF_FAIL("safetensors: tensor '", name, "': dtype must be a string");
          std::string const d = string();
          DRDIFF_CHECK(parse_dtype(d, t.type), "safetensors: tensor '", name, "': unknown dtype '", d, "'");
        } else if (key == "shape") {
          DRDIFF_CHECK(!has_shape, "safetensors: tensor '", name, "': duplicate shape");
          has_shape = true;
          for (auto v : int_array(name, "shape")) {
            DRDIFF_CHECK(v <= std::uint64_t(std::numeric_limits<std::int64_t>::max()), "safetensors: tensor '", name,
                         "': shape entry ", v, " is too large");
            t.shape.push_back(std::int64_t(v));
          }
        } else if (key == "data_offsets") {
          DRDIFF_CHECK(!has_offsets, "safetensors: tensor '", name, "': duplicate data_offsets");
          has_offsets = true;
          auto const o = int_array(name, "data_offsets");
          DRDIFF_CHECK(o.size() == 2, "safetensors: tensor '", name, "': data_offsets must be [begin, end], got ",
                       o.size(), " entries");
          t.begin = o[0];
          t.end = o[1];
        } else {
          DRDIFF_FAIL("safetensors: tensor '", name, "': unknown field '", key, "'");
        }
        ws();
        if (peek() == ',') {
          ++i_;
          continue;
        }
        expect('}', "expected ',' or '}' in a tensor entry");
        break;
      }
    } else {
      ++i_;
    }
    DRDIFF_CHECK(has_dtype, "safetensors: tensor '", name, "': missing dtype");
    DRDIFF_CHECK(has_shape, "safetensors: tensor '", name, "': missing shape");
    DRDIFF_CHECK(has_offsets, "safetensors: tensor '", name, "': missing data_offsets");
    return t;
  }
};

}  // namespace detail

/// A safetensors file held in memory.
class file {
 public:
  static constexpr std::uint64_t max_header_bytes = 100u << 20;

  /// Parses and validates `bytes` (the whole file).
  static file parse(std::vector<std::uint8_t> bytes) {
    file f;
    f.bytes_ = std::move(bytes);
    f.validate();
    return f;
  }
  /// Reads and validates the file at `path`.
  static file open(std::string const& path) {
    std::vector<std::uint8_t> b = ::drdiff::detail::read_regular_file(path, "safetensors");
    try {
      return parse(std::move(b));
    } catch (error const& e) {
      throw error(std::string(e.what()) + " (file '" + path + "')");
    }
  }

  std::vector<tensor_info> const& tensors() const noexcept { return tensors_; }
  std::map<std::string, std::string> const& metadata() const noexcept { return metadata_; }
  tensor_info const* find(std::string const& name) const noexcept {
    for (auto const& t : tensors_)
      if (t.name == name) return &t;
    return nullptr;
  }
  tensor_info const& at(std::string const& name) const {
    auto const* t = find(name);
    DRDIFF_CHECK(t != nullptr, "safetensors: missing tensor '", name, "'");
    return *t;
  }
  /// The raw bytes of a tensor (validated to lie inside the file).
  std::uint8_t const* data(tensor_info const& t) const noexcept { return bytes_.data() + data_start_ + t.begin; }

  /// Converts tensor `name` (F32, F16 or BF16) to float, checking its shape against `expect`.
  void read(std::string const& name, std::vector<std::int64_t> const& expect, float* out) const {
    auto const& t = at(name);
    DRDIFF_CHECK(t.shape == expect, "safetensors: tensor '", name, "' has shape ", shape_string(t.shape),
                 ", expected ", shape_string(expect));
    convert(t, out);
  }
  /// Converts a tensor to float whatever its shape (F32, F16, BF16).
  void convert(tensor_info const& t, float* out) const {
    std::uint8_t const* p = data(t);
    std::size_t const n = std::size_t(t.elements());
    switch (t.type) {
      case dtype::f32: if (n) std::memcpy(out, p, n * 4); break;
      case dtype::f16:
      case dtype::bf16:
        for (std::size_t i = 0; i < n; ++i) {
          std::uint16_t h;
          std::memcpy(&h, p + 2 * i, 2);
          out[i] = t.type == dtype::f16 ? f16_to_float(h) : bf16_to_float(h);
        }
        break;
      default:
        DRDIFF_FAIL("safetensors: tensor '", t.name, "' has dtype ", name(t.type),
                    "; model weights must be F32, F16 or BF16");
    }
  }

 private:
  std::vector<std::uint8_t> bytes_;
  std::size_t data_start_ = 0;
  std::vector<tensor_info> tensors_;
  std::map<std::string, std::string> metadata_;

  void validate() {
    std::size_t const size = bytes_.size();
    DRDIFF_CHECK(size >= 8, "safetensors: the file has ", size, " bytes, fewer than the 8-byte header length");
    std::uint64_t n = 0;
    for (int k = 7; k >= 0; --k) n = (n << 8) | bytes_[std::size_t(k)];
    DRDIFF_CHECK(n <= max_header_bytes, "safetensors: header length ", n, " exceeds the 100 MB limit");
    DRDIFF_CHECK(n <= size - 8, "safetensors: header length ", n, " goes beyond the file (", size - 8,
                 " bytes after the length)");
    data_start_ = 8 + std::size_t(n);
    detail::header_parser(reinterpret_cast<char const*>(bytes_.data() + 8), std::size_t(n)).parse(tensors_, metadata_);
    std::uint64_t const data_bytes = size - data_start_;
    for (auto const& t : tensors_) {
      std::uint64_t bytes = size_of(t.type);
      for (auto s : t.shape) {
        DRDIFF_CHECK(s == 0 || bytes <= std::numeric_limits<std::uint64_t>::max() / std::uint64_t(s),
                     "safetensors: tensor '", t.name, "': the byte size of shape ", shape_string(t.shape),
                     " overflows");
        bytes *= std::uint64_t(s);
      }
      DRDIFF_CHECK(t.begin <= t.end, "safetensors: tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end,
                   "] end before they begin");
      DRDIFF_CHECK(t.end <= data_bytes, "safetensors: tensor '", t.name, "': data_offsets [", t.begin, ", ", t.end,
                   "] go beyond the data buffer (", data_bytes, " bytes)");
      DRDIFF_CHECK(t.end - t.begin == bytes, "safetensors: tensor '", t.name, "': ", name(t.type), " shape ",
                   shape_string(t.shape), " needs ", bytes, " bytes but data_offsets [", t.begin, ", ", t.end,
                   "] hold ", t.end - t.begin);
    }
    // The buffer is covered exactly: sorted by offset, each tensor starts where the previous ended.
    std::vector<tensor_info const*> order;
    for (auto const& t : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(), [](auto a, auto b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
    std::uint64_t at = 0;
    std::string prev = "the start of the buffer";
    for (auto const* t : order) {
      DRDIFF_CHECK(t->begin >= at, "safetensors: tensor '", t->name, "' overlaps ", prev, " (it begins at ", t->begin,
                   ", before ", at, ")");
      DRDIFF_CHECK(t->begin == at, "safetensors: a hole of ", t->begin - at, " bytes lies before tensor '", t->name,
                   "'");
      at = t->end;
      prev = "tensor '" + t->name + "'";
    }
    DRDIFF_CHECK(at == data_bytes, "safetensors: ", data_bytes - at, " bytes after the last tensor are not indexed");
  }
};

// ---- writing -------------------------------------------------------------------------------------

/// Collects tensors and writes a safetensors file (names sorted, header padded with spaces to a
/// multiple of 8 bytes, tensors in name order).
class writer {
 public:
  std::map<std::string, std::string> metadata;

  /// Adds `count` floats stored as `type` (F32, F16 or BF16: converted, round to nearest even).
  void add(std::string const& name, dtype type, std::vector<std::int64_t> const& shape, float const* values) {
    DRDIFF_CHECK(type == dtype::f32 || type == dtype::f16 || type == dtype::bf16, "safetensors::writer: tensor '",
                 name, "': dtype ", safetensors::name(type), " cannot be written from floats");
    DRDIFF_CHECK(!name.empty() && name != "__metadata__", "safetensors::writer: bad tensor name '", name, "'");
    DRDIFF_CHECK(entries_.count(name) == 0, "safetensors::writer: duplicate tensor '", name, "'");
    std::int64_t n = 1;
    for (auto s : shape) {
      DRDIFF_CHECK(s >= 0, "safetensors::writer: tensor '", name, "': negative shape entry ", s);
      n *= s;
    }
    entry e;
    e.type = type;
    e.shape = shape;
    e.bytes.resize(std::size_t(n) * size_of(type));
    for (std::int64_t i = 0; i < n; ++i) {
      if (type == dtype::f32) {
        std::memcpy(e.bytes.data() + 4 * i, values + i, 4);
      } else {
        std::uint16_t const h = type == dtype::f16 ? float_to_f16(values[i]) : float_to_bf16(values[i]);
        std::memcpy(e.bytes.data() + 2 * i, &h, 2);
      }
    }
    entries_.emplace(name, std::move(e));
  }

  std::vector<std::uint8_t> bytes() const {
    std::string h = "{";
    bool first = true;
    auto quote = [](std::string const& s) {
      std::string o = "\"";
      for (unsigned char c : s) {
        if (c == '"' || c == '\\') {
          o += '\\';
          o += char(c);
        } else if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          o += buf;
        } else {
          o += char(c);
        }
      }
      return o + "\"";
    };
    if (!metadata.empty()) {
      h += "\"__metadata__\":{";
      bool f = true;
      for (auto const& kv : metadata) {
        h += (f ? "" : ",") + quote(kv.first) + ":" + quote(kv.second);
        f = false;
      }
      h += "}";
      first = false;
    }
    std::uint64_t off = 0;
    for (auto const& kv : entries_) {
      h += (first ? "" : ",") + quote(kv.first) + ":{\"dtype\":\"" + name(kv.second.type) + "\",\"shape\":" +
           shape_string(kv.second.shape) + ",\"data_offsets\":[" + std::to_string(off) + "," +
           std::to_string(off + kv.second.bytes.size()) + "]}";
      off += kv.second.bytes.size();
      first = false;
    }
    h += "}";
    while (h.size() % 8) h += ' ';
    std::uint64_t const n = h.size();
    std::vector<std::uint8_t> out(8 + h.size() + std::size_t(off));
    for (int k = 0; k < 8; ++k) out[std::size_t(k)] = std::uint8_t(n >> (8 * k));
    std::memcpy(out.data() + 8, h.data(), h.size());
    std::size_t at = 8 + h.size();
    for (auto const& kv : entries_) {
      if (!kv.second.bytes.empty()) std::memcpy(out.data() + at, kv.second.bytes.data(), kv.second.bytes.size());
      at += kv.second.bytes.size();
    }
    return out;
  }
  /// Writes the file through a temporary file in the same folder and a rename: an interrupted or
  /// failed save leaves whatever was at `path` before.
  void save(std::string const& path) const {
    auto const b = bytes();
    ::drdiff::detail::write_file_atomically(path, b.data(), b.size(), "safetensors::writer");
  }

 private:
  struct entry {
    dtype type;
    std::vector<std::int64_t> shape;
    std::vector<std::uint8_t> bytes;
  };
  std::map<std::string, entry> entries_;
};

}  // namespace safetensors
DRDIFF_NAMESPACE_END
