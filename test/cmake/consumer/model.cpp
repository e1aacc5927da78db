// A user's project with DrDiff's optional parts: a model directory's settings from config.json text
// (nlohmann-json) and SentencePiece tokens. argv[1]: a SentencePiece model file.

#include <drdiff/cpu/model.hpp>
#include <drdiff/model/directory.hpp>
#include <drdiff/model/sentencepiece.hpp>

#include <cstdio>
#include <vector>

int main(int argc, char** argv) {
  auto const d = drdiff::model_directory::from_json(R"({
    "format": "drdiff-model", "version": 1,
    "sizes": {"vocab": 8192, "embed_dim": 16, "d_model": 64, "heads": 1, "blocks": 1, "experts": 2, "d_ff": 32,
              "shared_experts": 0, "time_dim": 16},
    "activation": "gelu", "rope_base": 10000.0, "norm_eps": 1e-5, "prediction": "categorical",
    "router": {"kind": "top_k", "k": 1, "renormalize": true},
    "attention": {"kind": "hsa", "tiers": [{"max_len": 2147483647, "dense": true, "window": 0, "rate": 1, "span": 0,
                                            "globals": {"rule": "none", "count": 0, "sqrt_cap": 0}}]},
    "schedule": {"kind": "sqrt", "delta": 1e-4},
    "sampling": {"solver": "2m", "steps": 3, "t_start": 0.99, "t_end": 0.0, "spacing": "uniform_t", "rounding": "dot"},
    "tokenizer": {"kind": "sentencepiece", "file": "tokenizer.model"},
    "weights": "model.safetensors"})");
  drdiff::model<drdiff::cpu, drdiff::model_config<>> m(d.config);
  m.init_random(1);
  if (argc < 2) return 2;
  auto const tok = drdiff::sentencepiece_tokenizer::from_file(argv[1]);
  drdiff::generation_request r;
  r.prompt = tok.encode("Hello");
  r.length = 20;
  auto const out = m.generate(drdiff::context<drdiff::cpu>{}, r);
  std::printf("consumer_model: %zu tokens, %d evaluations\n", out.tokens.size(), out.evaluations);
  return out.tokens.size() == 20 && out.evaluations == 3 ? 0 : 1;
}
