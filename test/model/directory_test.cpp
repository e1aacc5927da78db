// Model directories: config.json read at run time, every bad input a drdiff::error naming it (missing
// files, special files, unknown keys, wrong types, a config that disagrees with the tensors), the
// categorical data prediction against a plain double-precision loop, and the shipped checkpoint
// (models/drdiff-text) against the golden tensors and tokens that PyTorch made from it.

#include "../support/drdiff_test.hpp"

#include <drdiff/cpu/model.hpp>
#include <drdiff/model/directory.hpp>
#include <drdiff/model/safetensors.hpp>
#if defined(DRDIFF_HAS_SENTENCEPIECE)
#include <drdiff/model/sentencepiece.hpp>
#endif

#include <catch2/catch.hpp>

#include <nlohmann/json.hpp>

#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

using namespace drdiff;
using Catch::Matchers::Contains;
using json = nlohmann::json;

namespace {

std::string const shipped = std::string(DRDIFF_SOURCE_DIR) + "/models/drdiff-text";
std::string const golden = std::string(DRDIFF_SOURCE_DIR) + "/test/model/golden";

json small_config() {
  return json::parse(R"({
    "format": "drdiff-model", "version": 1,
    "sizes": {"vocab": 256, "embed_dim": 16, "d_model": 64, "heads": 1, "blocks": 2, "experts": 4, "d_ff": 32,
              "shared_experts": 0, "time_dim": 16},
    "activation": "gelu", "rope_base": 10000.0, "norm_eps": 1e-5, "prediction": "categorical",
    "router": {"kind": "top_k", "k": 2, "renormalize": true},
    "attention": {"kind": "hsa", "tiers": [
      {"max_len": 64, "dense": true, "window": 0, "rate": 1, "span": 0,
       "globals": {"rule": "none", "count": 0, "sqrt_cap": 0}},
      {"max_len": 2147483647, "dense": false, "window": 8, "rate": 3, "span": 40,
       "globals": {"rule": "first", "count": 4, "sqrt_cap": 0}}]},
    "schedule": {"kind": "sqrt", "delta": 1e-4},
    "sampling": {"solver": "3m", "steps": 7, "t_start": 0.99, "t_end": 0.0, "spacing": "uniform_t",
                 "rounding": "dot"},
    "tokenizer": {"kind": "bytes"},
    "weights": "model.safetensors"
  })");
}

/// A fresh directory under the build tree with `cfg` as config.json and, unless `weights` is false,
/// random weights of the sizes it names.
std::string make_dir(json const& cfg, std::string const& name, bool weights = true) {
  std::string const dir = "model_dir_" + name;
  ::mkdir(dir.c_str(), 0755);
  std::ofstream(dir + "/config.json") << cfg.dump(1);
  if (weights) {
    model_config<> c;
    c.sizes.vocab = cfg["sizes"]["vocab"];
    c.sizes.embed_dim = cfg["sizes"]["embed_dim"];
    c.sizes.d_model = cfg["sizes"]["d_model"];
    c.sizes.heads = cfg["sizes"]["heads"];
    c.sizes.blocks = cfg["sizes"]["blocks"];
    c.sizes.experts = cfg["sizes"]["experts"];
    c.sizes.d_ff = cfg["sizes"]["d_ff"];
    c.sizes.time_dim = cfg["sizes"]["time_dim"];
    model<cpu, model_config<>> m(c);
    m.init_random(11);
    m.save(dir + "/model.safetensors");
  }
  return dir;
}

}  // namespace

TEST_CASE("a model directory's config.json sets sizes, tiers, router, schedule and sampling at run time",
          "[model][directory][cpu]") {
  auto const dir = model_directory::open(make_dir(small_config(), "ok"));
  auto const& c = dir.config;
  CHECK(c.sizes.d_model == 64);
  CHECK(c.sizes.blocks == 2);
  CHECK(c.output == prediction::categorical);
  CHECK(c.solver.order == 3);
  CHECK(c.steps == 7);
  CHECK(c.router.k == 2);
  REQUIRE(c.attention.num_tiers == 2);
  CHECK(c.attention.tiers[0].dense);
  CHECK(c.attention.tiers[1].window == 8);
  CHECK(c.attention.tiers[1].rate == 3);
  CHECK(c.attention.tiers[1].globals.count == 4);
  CHECK(dir.tokenizer_kind == "bytes");
  model<cpu, model_config<>> m(c);
  dir.load_into(m);
  std::vector<int> prompt{72, 105};
  generation_request req;
  req.prompt = prompt;
  req.length = 90;  // N = 92 > 64: the sparse tier
  req.seed = 5;
  auto const r = m.generate(context<cpu>{}, req);
  CHECK(r.tokens.size() == 90);
  CHECK(r.evaluations == 7);
}

TEST_CASE("a bad model directory is an error naming the file or the key", "[model][directory][errors][cpu]") {
  CHECK_THROWS_WITH(model_directory::open("no_such_model_dir"), Contains("no_such_model_dir"));
  {  // a file where the directory should be
    std::ofstream("not_a_dir.txt") << "x";
    CHECK_THROWS_WITH(model_directory::open("not_a_dir.txt"), Contains("is not a directory"));
  }
  {  // no config.json
    ::mkdir("empty_model_dir", 0755);
    CHECK_THROWS_WITH(model_directory::open("empty_model_dir"), Contains("empty_model_dir/config.json"));
  }
  {  // config.json is a directory
    ::mkdir("cfg_is_dir", 0755);
    ::mkdir("cfg_is_dir/config.json", 0755);
    CHECK_THROWS_WITH(model_directory::open("cfg_is_dir"), Contains("is a directory, not a file"));
  }
  {  // config.json is a FIFO: refused before any read, so nothing blocks
    ::mkdir("cfg_is_fifo", 0755);
    ::unlink("cfg_is_fifo/config.json");
    REQUIRE(::mkfifo("cfg_is_fifo/config.json", 0644) == 0);
    CHECK_THROWS_WITH(model_directory::open("cfg_is_fifo"), Contains("FIFO"));
  }
  {  // a device as the weights
    ::mkdir("weights_is_device", 0755);
    auto c = small_config();
    c["weights"] = "null";
    std::ofstream("weights_is_device/config.json") << c.dump();
    ::unlink("weights_is_device/null");
    REQUIRE(::symlink("/dev/null", "weights_is_device/null") == 0);
    CHECK_THROWS_WITH(model_directory::open("weights_is_device"), Contains("is a device"));
  }
  {  // not JSON
    ::mkdir("cfg_not_json", 0755);
    std::ofstream("cfg_not_json/config.json") << "{\"format\": ";
    CHECK_THROWS_WITH(model_directory::open("cfg_not_json"), Contains("not valid JSON"));
  }
  auto bad = [](char const* name, auto&& edit, char const* message) {
    json c = small_config();
    edit(c);
    std::string const d = make_dir(c, name, false);
    model_config<> cc;
    model<cpu, model_config<>>(cc).save(d + "/model.safetensors");
    INFO(name);
    CHECK_THROWS_WITH(model_directory::open(d), Contains(message));
  };
  bad("unknown_key", [](json& c) { c["sizes"]["layers"] = 3; }, "unknown key 'layers' in sizes");
  bad("wrong_type", [](json& c) { c["sizes"]["d_model"] = "64"; }, "sizes.d_model must be an integer");
  bad("negative", [](json& c) { c["sizes"]["heads"] = -1; }, "sizes.heads = -1 is outside");
  bad("no_sizes", [](json& c) { c.erase("sizes"); }, "has no 'sizes'");
  bad("bad_heads", [](json& c) { c["sizes"]["heads"] = 3; }, "multiple of heads = 3");
  bad("bad_solver", [](json& c) { c["sampling"]["solver"] = "euler"; }, "sampling.solver = 'euler'");
  bad("bad_format", [](json& c) { c["format"] = "gguf"; }, "format = 'gguf'");
  bad("tiers_order", [](json& c) { c["attention"]["tiers"][1]["max_len"] = 10; }, "must be above the previous");
  bad("bad_pred", [](json& c) { c["prediction"] = "score"; }, "prediction = 'score'");
  bad("bad_self_condition", [](json& c) { c["self_condition"] = 1; }, "self_condition must be true or false");
  bad("nan_rope", [](json& c) { c["rope_base"] = -2.0; }, "rope_base = -2 must be > 1");
  bad("path_escape", [](json& c) { c["weights"] = "../x.safetensors"; }, "plain file name");
  bad("missing_tokenizer", [](json& c) { c["tokenizer"] = {{"kind", "sentencepiece"}, {"file", "tok.model"}}; },
      "missing_tokenizer/tok.model");
  bad("bytes_vocab", [](json& c) { c["sizes"]["vocab"] = 300; }, "needs sizes.vocab = 256");
  {  // a config that disagrees with the tensors
    json c = small_config();
    std::string const d = make_dir(c, "disagree");
    c["sizes"]["d_ff"] = 48;
    std::ofstream(d + "/config.json") << c.dump();
    auto const dir = model_directory::open(d);
    model<cpu, model_config<>> m(dir.config);
    CHECK_THROWS_WITH(dir.load_into(m), Contains("config.json and model.safetensors disagree") &&
                                           Contains("blocks.0.moe.experts.up"));
    c["sizes"]["d_ff"] = 32;  // self-conditioned, but the weights have no up_sc.weight
    c["self_condition"] = true;
    std::ofstream(d + "/config.json") << c.dump();
    auto const sc = model_directory::open(d);
    CHECK(sc.config.sizes.self_condition);
    model<cpu, model_config<>> msc(sc.config);
    CHECK_THROWS_WITH(sc.load_into(msc), Contains("disagree") && Contains("up_sc.weight"));
  }
}

TEST_CASE("the categorical data prediction is softmax(z·Eᵀ)·E, and a NaN in z stays NaN", "[model][directory][cpu]") {
  auto const dir = model_directory::open(make_dir(small_config(), "categorical"));
  auto cfg = dir.config;
  model<cpu, model_config<>> cat(cfg);
  dir.load_into(cat);
  cfg.output = prediction::embedding;
  model<cpu, model_config<>> emb(cfg);
  dir.load_into(emb);
  int const n = 70, de = cfg.sizes.embed_dim, V = cfg.sizes.vocab;
  std::mt19937_64 rng(drdiff::test::fresh_seed());
  std::normal_distribution<float> nd;
  std::vector<float> xt(std::size_t(n) * de), z(xt.size()), x0(xt.size());
  for (auto& v : xt) v = nd(rng);
  emb.forward(context<cpu>{}, xt.data(), 0.4, z.data(), 1, n);
  cat.forward(context<cpu>{}, xt.data(), 0.4, x0.data(), 1, n);
  auto const& E = cat.tensor("embed.weight");
  double worst = 0;
  for (int r = 0; r < n; ++r) {
    std::vector<double> l(std::size_t(V), 0.0);
    double mx = -1e300;
    for (int v = 0; v < V; ++v) {
      for (int k = 0; k < de; ++k) l[v] += double(z[std::size_t(r) * de + k]) * E[std::size_t(v) * de + k];
      mx = std::max(mx, l[v]);
    }
    double sum = 0;
    for (auto& v : l) sum += (v = std::exp(v - mx));
    for (int k = 0; k < de; ++k) {
      double ref = 0;
      for (int v = 0; v < V; ++v) ref += l[v] / sum * E[std::size_t(v) * de + k];
      worst = std::max(worst, std::abs(ref - x0[std::size_t(r) * de + k]) / (1.0 + std::abs(ref)));
    }
  }
  CHECK(worst < 1e-5);
  // A NaN in x_t is refused (the router names it); a NaN reaching z makes that row of x̂0 NaN.
  xt[5 * de + 3] = std::nanf("");
  CHECK_THROWS_WITH(cat.forward(context<cpu>{}, xt.data(), 0.4, x0.data(), 1, n), Contains("is not finite"));
  z[7 * de + 2] = std::nanf("");
  std::vector<float> scratch(std::size_t(detail::resolve_threads(0)) * detail::categorical_chunk * V);
  detail::categorical_rows(context<cpu>{}, z.data(), n, de, E.data(), V, scratch.data());
  for (int k = 0; k < de; ++k) CHECK(std::isnan(z[7 * de + k]));
  CHECK(std::isfinite(z[6 * de]));
}

namespace {

bool have_golden() {
  struct stat st {};
  return ::stat((golden + "/forward.safetensors").c_str(), &st) == 0;
}

}  // namespace

TEST_CASE("the shipped checkpoint's CPU forward equals PyTorch's on the golden inputs (fp32, 1e-4)",
          "[model][directory][parity][cpu]") {
  REQUIRE(have_golden());
  auto const dir = model_directory::open(shipped);
  model<cpu, model_config<>> m(dir.config);
  dir.load_into(m);
  auto const g = safetensors::file::open(golden + "/forward.safetensors");
  for (auto const& t : g.tensors()) {
    if (t.name.rfind("xt.", 0) != 0) continue;
    std::string const tag = t.name.substr(3);
    int const n = int(t.shape[0]), de = int(t.shape[1]);
    std::vector<float> xt(std::size_t(n) * de), ref(xt.size()), tv(1), x0(xt.size());
    g.read("xt." + tag, {n, de}, xt.data());
    g.read("x0." + tag, {n, de}, ref.data());
    g.read("t." + tag, {1}, tv.data());
    m.forward(context<cpu>{}, xt.data(), double(tv[0]), x0.data(), 1, n);
    double num = 0, den = 0, worst = 0;
    for (std::size_t i = 0; i < x0.size(); ++i) {
      num += double(x0[i] - ref[i]) * (x0[i] - ref[i]);
      den += double(ref[i]) * ref[i];
      worst = std::max(worst, double(std::abs(x0[i] - ref[i])));
    }
    INFO(tag << ": N = " << n << ", t = " << tv[0] << ", max |diff| = " << worst);
    CHECK(std::sqrt(num / den) < 1e-4);
  }
}

TEST_CASE("the C++ sampler gives PyTorch's tokens at >= 99% of positions for the same seed and prompt",
          "[model][directory][parity][cpu]") {
  REQUIRE(have_golden());
  auto const dir = model_directory::open(shipped);
  std::ifstream in(golden + "/samples.json");
  REQUIRE(in.good());
  json const cases = json::parse(in);
  for (auto const& c : cases) {
    auto cfg = dir.config;
    cfg.steps = c["steps"];
    cfg.solver.order = c["order"];
    model<cpu, model_config<>> m(cfg);
    dir.load_into(m);
    generation_request req;
    req.prompt = c["prompt"].get<std::vector<int>>();
    req.length = c["length"];
    req.seed = c["seed"];
    auto const r = m.generate(context<cpu>{}, req);
    auto const want = c["tokens"].get<std::vector<int>>();
    REQUIRE(r.tokens.size() == want.size());
    std::size_t same = 0;
    for (std::size_t i = 0; i < want.size(); ++i) same += r.tokens[i] == want[i];
    INFO("order " << cfg.solver.order << ", " << cfg.steps << " steps, seed " << req.seed << ": " << same << " of "
                  << want.size() << " tokens equal");
    CHECK(double(same) >= 0.99 * double(want.size()));
  }
}

#if defined(DRDIFF_HAS_SENTENCEPIECE)
TEST_CASE("the C++ SentencePiece tokenizer gives Python's ids for the shipped tokenizer", "[model][tokenizer][cpu]") {
  REQUIRE(have_golden());
  auto const tok = sentencepiece_tokenizer::from_file(shipped + "/tokenizer.model");
  std::ifstream in(golden + "/tokens.json");
  REQUIRE(in.good());
  json const cases = json::parse(in);
  REQUIRE(cases.size() >= 10);
  for (auto const& c : cases) {
    std::string const text = c["text"];
    auto const want = c["ids"].get<std::vector<int>>();
    CHECK(tok.encode(text) == want);
    CHECK(tok.decode(want) == c["decoded"].get<std::string>());
  }
  CHECK_THROWS_WITH(sentencepiece_tokenizer::from_file(golden + "/tokens.json"), Contains("not a SentencePiece model"));
  CHECK_THROWS_WITH(sentencepiece_tokenizer::from_file(golden), Contains("is a directory"));
  CHECK_THROWS_WITH(tok.decode({tok.vocab()}), Contains("outside the vocabulary"));
}
#endif
