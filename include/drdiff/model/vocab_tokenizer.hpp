#pragma once
/// \file
/// vocab_tokenizer: tokens from a JSON file holding an array of strings (token id = index), read
/// with nlohmann-json; encoding is greedy longest match. Needs nlohmann-json (Debian
/// nlohmann-json3-dev); byte_tokenizer (model/tokenizer.hpp) needs nothing.

#include <drdiff/core/error.hpp>
#include <drdiff/core/file.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

/// Tokens from a JSON file holding an array of strings (token id = index). Encoding is greedy
/// longest match; a byte no token starts with is an error naming its position.
class vocab_tokenizer {
 public:
  static vocab_tokenizer from_json(std::string const& json) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(json);  // also refuses invalid UTF-8
    } catch (nlohmann::json::exception const& e) {
      DRDIFF_FAIL("vocab_tokenizer: bad JSON: ", e.what());
    }
    DRDIFF_CHECK(j.is_array(), "vocab_tokenizer: expected an array of strings, got ", j.type_name());
    DRDIFF_CHECK(!j.empty(), "vocab_tokenizer: the vocabulary is empty");
    vocab_tokenizer t;
    for (std::size_t i = 0; i < j.size(); ++i) {
      DRDIFF_CHECK(j[i].is_string(), "vocab_tokenizer: entry ", i, ": expected a string, got ", j[i].dump());
      std::string s = j[i].get<std::string>();
      DRDIFF_CHECK(!s.empty(), "vocab_tokenizer: entry ", i, " is an empty token");
      DRDIFF_CHECK(t.index_.count(s) == 0, "vocab_tokenizer: duplicate token '", s, "' (id ", t.tokens_.size(), ")");
      t.index_.emplace(s, int(t.tokens_.size()));
      t.longest_ = std::max(t.longest_, s.size());
      t.tokens_.push_back(std::move(s));
    }
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
