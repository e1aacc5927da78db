#pragma once
/// \file
/// Tokenizers of the generation pipeline. byte_tokenizer (the default, V = 256: a token is a byte,
/// no vocabulary file) and vocab_tokenizer (a JSON array of token strings; greedy longest match).

#include <drdiff/core/error.hpp>
#include <drdiff/core/file.hpp>
#include <drdiff/core/json.hpp>

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <string>
#include <unordered_map>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

struct byte_tokenizer {
  int vocab() const noexcept { return 256; }
  std::vector<int> encode(std::string const& text) const {
    std::vector<int> ids;
    ids.reserve(text.size());
    for (unsigned char c : text) ids.push_back(int(c));
    return ids;
  }
  std::string decode(std::vector<int> const& ids) const {
    std::string s;
    s.reserve(ids.size());
    for (std::size_t i = 0; i < ids.size(); ++i) {
      DRDIFF_CHECK(ids[i] >= 0 && ids[i] < 256, "byte_tokenizer: token ", i, " = ", ids[i], " is not a byte");
      s += char(ids[i]);
    }
    return s;
  }
};

/// Tokens from a JSON file holding an array of strings (token id = index). Encoding is greedy
/// longest match; a byte no token starts with is an error naming its position.
class vocab_tokenizer {
 public:
  static vocab_tokenizer from_json(std::string const& json) {
    vocab_tokenizer t;
    detail::json_cursor c(json.data(), json.size(), "vocab_tokenizer: bad JSON");
    c.ws();
    c.expect('[', "expected an array of strings");
    c.ws();
    if (c.peek() == ']') c.fail("the vocabulary is empty");
    for (;;) {
      c.ws();
      if (c.peek() != '"') c.fail("expected a string");
      std::string s = c.string();
      if (s.empty()) c.fail("empty token");
      DRDIFF_CHECK(t.index_.count(s) == 0, "vocab_tokenizer: duplicate token '", s, "' (id ", t.tokens_.size(), ")");
      t.index_.emplace(s, int(t.tokens_.size()));
      t.longest_ = std::max(t.longest_, s.size());
      t.tokens_.push_back(std::move(s));
      c.ws();
      if (c.peek() == ',') {
        c.expect(',', "");
        continue;
      }
      c.expect(']', "expected ',' or ']'");
      break;
    }
    c.ws();
    if (!c.at_end()) c.fail("unexpected bytes after the array");
    return t;
  }
  static vocab_tokenizer from_file(std::string const& path) {
    auto const b = detail::read_regular_file(path, "vocab_tokenizer", std::uint64_t(1) << 30);
    return from_json(std::string(b.begin(), b.end()));
  }

  int vocab() const noexcept { return int(tokens_.size()); }
  std::vector<int> encode(std::string const& text) const {
    std::vector<int> ids;
    std::size_t i = 0;
    while (i < text.size()) {
      std::size_t len = std::min(longest_, text.size() - i);
      for (; len > 0; --len) {
        auto const it = index_.find(text.substr(i, len));
        if (it != index_.end()) {
          ids.push_back(it->second);
          break;
        }
      }
      DRDIFF_CHECK(len > 0, "vocab_tokenizer: no token matches the text at byte ", i);
      i += len;
    }
    return ids;
  }
  std::string decode(std::vector<int> const& ids) const {
    std::string s;
    for (std::size_t i = 0; i < ids.size(); ++i) {
      DRDIFF_CHECK(ids[i] >= 0 && ids[i] < vocab(), "vocab_tokenizer: token ", i, " = ", ids[i], " is outside 0..",
                   vocab() - 1);
      s += tokens_[std::size_t(ids[i])];
    }
    return s;
  }

 private:
  std::vector<std::string> tokens_;
  std::unordered_map<std::string, int> index_;
  std::size_t longest_ = 0;
};

DRDIFF_NAMESPACE_END
