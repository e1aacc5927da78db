#pragma once
/// \file
/// sentencepiece_tokenizer: the model directory's tokenizer through the SentencePiece C++ library
/// (Debian libsentencepiece-dev; link `drdiff::sentencepiece`, or -lsentencepiece). The same
/// .model file gives the same ids here as in Python's `sentencepiece` (test/model/tokenizer_test).
/// Only this header needs the library: byte_tokenizer and vocab_tokenizer (model/tokenizer.hpp) do not.

#include <drdiff/core/error.hpp>
#include <drdiff/core/file.hpp>

#include <sentencepiece_processor.h>

#include <memory>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

class sentencepiece_tokenizer {
 public:
  /// Loads a SentencePiece model; a path that is not a regular readable file, or a file that is
  /// not a SentencePiece model, is a drdiff::error naming it.
  static sentencepiece_tokenizer from_file(std::string const& path) {
    auto const bytes = detail::read_regular_file(path, "sentencepiece_tokenizer", std::uint64_t(1) << 30);
    sentencepiece_tokenizer t;
    t.sp_ = std::make_shared<sentencepiece::SentencePieceProcessor>();
    auto const st = t.sp_->LoadFromSerializedProto(std::string(bytes.begin(), bytes.end()));
    DRDIFF_CHECK(st.ok(), "sentencepiece_tokenizer: '", path, "' is not a SentencePiece model: ", st.ToString());
    return t;
  }

  int vocab() const noexcept { return sp_ ? sp_->GetPieceSize() : 0; }
  /// The id of a piece, or -1 when the vocabulary does not hold it.
  int piece_id(std::string const& piece) const {
    loaded();
    int const id = sp_->PieceToId(piece);
    return id == sp_->unk_id() && piece != sp_->IdToPiece(sp_->unk_id()) ? -1 : id;
  }
  std::vector<int> encode(std::string const& text) const {
    loaded();
    std::vector<int> ids;
    auto const st = sp_->Encode(text, &ids);
    DRDIFF_CHECK(st.ok(), "sentencepiece_tokenizer: cannot encode the text: ", st.ToString());
    return ids;
  }
  std::string decode(std::vector<int> const& ids) const {
    loaded();
    for (std::size_t i = 0; i < ids.size(); ++i)
      DRDIFF_CHECK(ids[i] >= 0 && ids[i] < vocab(), "sentencepiece_tokenizer: token ", i, " = ", ids[i],
                   " is outside the vocabulary 0..", vocab() - 1);
    std::string text;
    auto const st = sp_->Decode(ids, &text);
    DRDIFF_CHECK(st.ok(), "sentencepiece_tokenizer: cannot decode: ", st.ToString());
    return text;
  }

 private:
  std::shared_ptr<sentencepiece::SentencePieceProcessor> sp_;
  void loaded() const {
    DRDIFF_CHECK(sp_ != nullptr, "sentencepiece_tokenizer: no model loaded (use sentencepiece_tokenizer::from_file)");
  }
};

DRDIFF_NAMESPACE_END
