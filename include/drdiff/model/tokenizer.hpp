#pragma once
/// \file
/// byte_tokenizer, the generation pipeline's default (V = 256: a token is a byte, no vocabulary
/// file); no dependency. vocab_tokenizer (a JSON array of token strings, nlohmann-json):
/// model/vocab_tokenizer.hpp; SentencePiece models: model/sentencepiece.hpp.

#include <drdiff/core/error.hpp>

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

DRDIFF_NAMESPACE_END
