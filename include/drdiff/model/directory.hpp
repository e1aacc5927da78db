#pragma once
/// \file
/// A model directory (docs/weights.md): `config.json` (sizes, attention tiers, schedule, sampling
/// defaults, file names), the weights (`model.safetensors`) and the tokenizer model. The sizes are
/// read at run time, so a user's checkpoint needs no recompile. Needs nlohmann-json
/// (Debian nlohmann-json3-dev); the rest of the library does not.
///
///   auto dir = drdiff::model_directory::open("models/drdiff-text");
///   drdiff::model<drdiff::cpu, drdiff::model_config<>> m(dir.config);
///   m.load(dir.weights_path());   // or dir.load_into(m): also says which file disagrees
///
/// config.json is untrusted input: an unknown key, a value of the wrong type or out of range, a
/// missing file, or a file that is not a regular file is a drdiff::error naming the key or the path.

#include <drdiff/core/error.hpp>
#include <drdiff/core/file.hpp>
#include <drdiff/model/config.hpp>

#include <nlohmann/json.hpp>

#include <climits>
#include <cmath>
#include <initializer_list>
#include <string>

DRDIFF_NAMESPACE_BEGIN

struct model_directory {
  std::string path;                   ///< the directory
  model_config<> config;              ///< sizes, attention, router, schedule and sampling defaults
  std::string weights_file;           ///< relative to `path`
  std::string tokenizer_kind;         ///< "sentencepiece", "bytes" or "vocab-json"
  std::string tokenizer_file;         ///< relative to `path`; empty for "bytes"

  std::string weights_path() const { return path + "/" + weights_file; }
  std::string tokenizer_path() const { return tokenizer_file.empty() ? "" : path + "/" + tokenizer_file; }

  /// Reads and checks `dir`/config.json and that the files it names exist as regular files.
  static model_directory open(std::string const& dir) {
    DRDIFF_CHECK(!dir.empty(), "model directory: the path is empty");
    std::string const why = detail::not_regular_reason(dir);
    DRDIFF_CHECK(detail::is_directory(dir), "model directory: '", dir, "' is not a directory (",
                 why.empty() ? std::string("it is a file") : why, ")");
    std::string const cfg_path = dir + "/config.json";
    auto const bytes = detail::read_regular_file(cfg_path, "model directory", std::uint64_t(1) << 24);
    model_directory d = from_json(std::string(bytes.begin(), bytes.end()), cfg_path);
    d.path = dir;
    detail::check_regular_file(d.weights_path(), "model directory (weights)");
    if (!d.tokenizer_file.empty()) detail::check_regular_file(d.tokenizer_path(), "model directory (tokenizer)");
    return d;
  }

  /// The settings of a config.json text (no file is opened; `path` and the file names are not
  /// checked against the disk). `where` names the text in messages. Every malformed input is a
  /// drdiff::error (the fuzz target test/fuzz/config_fuzz.cpp holds it to that).
  static model_directory from_json(std::string const& text, std::string const& where = "config.json") {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(text);
    } catch (nlohmann::json::exception const& e) {
      DRDIFF_FAIL("model directory: '", where, "' is not valid JSON: ", e.what());
    }
    model_directory d;
    try {
      d.read(j);
    } catch (error const& e) {
      throw error(std::string(e.what()) + " (in '" + where + "')");
    } catch (nlohmann::json::exception const& e) {  // not expected: read() checks types first
      DRDIFF_FAIL("model directory: '", where, "': ", e.what());
    }
    return d;
  }

  /// Loads the weights into a model built from `config`; a tensor that disagrees with config.json
  /// (missing, extra, other shape) is an error naming both files.
  template <class Model>
  void load_into(Model& m) const {
    try {
      m.load(weights_path());
    } catch (error const& e) {
      throw error(std::string("model directory '") + path + "': config.json and " + weights_file +
                  " disagree: " + e.what());
    }
  }

 private:
  using json = nlohmann::json;

  static void only_keys(json const& o, char const* where, std::initializer_list<char const*> keys) {
    DRDIFF_CHECK(o.is_object(), "config.json: ", where, " must be an object");
    for (auto it = o.begin(); it != o.end(); ++it) {
      bool known = false;
      for (char const* k : keys) known |= it.key() == k;
      DRDIFF_CHECK(known, "config.json: unknown key '", it.key(), "' in ", where);
    }
  }
  static json const& need(json const& o, char const* key, char const* where) {
    DRDIFF_CHECK(o.contains(key), "config.json: ", where, " has no '", key, "'");
    return o.at(key);
  }
  static int integer(json const& o, char const* key, char const* where, long long lo, long long hi) {
    json const& v = need(o, key, where);
    DRDIFF_CHECK(v.is_number_integer(), "config.json: ", where, ".", key, " must be an integer, got ", v.dump());
    DRDIFF_CHECK(!v.is_number_unsigned() || v.get<unsigned long long>() <= (unsigned long long)hi, "config.json: ",
                 where, ".", key, " = ", v.dump(), " is outside ", lo, "..", hi);
    long long const x = v.get<long long>();
    DRDIFF_CHECK(x >= lo && x <= hi, "config.json: ", where, ".", key, " = ", x, " is outside ", lo, "..", hi);
    return int(x);
  }
  static double number(json const& o, char const* key, char const* where) {
    json const& v = need(o, key, where);
    DRDIFF_CHECK(v.is_number(), "config.json: ", where, ".", key, " must be a number, got ", v.dump());
    double const x = v.get<double>();
    DRDIFF_CHECK(std::isfinite(x), "config.json: ", where, ".", key, " = ", x, " is not finite");
    return x;
  }
  static bool boolean(json const& o, char const* key, char const* where) {
    json const& v = need(o, key, where);
    DRDIFF_CHECK(v.is_boolean(), "config.json: ", where, ".", key, " must be true or false, got ", v.dump());
    return v.get<bool>();
  }
  static std::string text(json const& o, char const* key, char const* where) {
    json const& v = need(o, key, where);
    DRDIFF_CHECK(v.is_string(), "config.json: ", where, ".", key, " must be a string, got ", v.dump());
    return v.get<std::string>();
  }
  /// A file name inside the directory: no absolute path, no "..", no directory separators.
  static std::string file_name(json const& o, char const* key, char const* where) {
    std::string const f = text(o, key, where);
    DRDIFF_CHECK(!f.empty() && f.find('/') == std::string::npos && f != "." && f != "..", "config.json: ", where,
                 ".", key, " = '", f, "' must be a plain file name inside the model directory");
    return f;
  }

  void read(json const& j) {
    only_keys(j, "the top level",
              {"format", "version", "sizes", "activation", "rope_base", "norm_eps", "prediction", "self_condition",
               "router", "attention", "schedule", "sampling", "tokenizer", "weights", "training", "card"});
    DRDIFF_CHECK(text(j, "format", "the top level") == "drdiff-model", "config.json: format = '",
                 j.at("format").get<std::string>(), "' is not 'drdiff-model'");
    integer(j, "version", "the top level", 1, 1);
    auto& c = config;
    json const& s = need(j, "sizes", "the top level");
    only_keys(s, "sizes", {"vocab", "embed_dim", "d_model", "heads", "blocks", "experts", "d_ff", "shared_experts",
                           "time_dim"});
    c.sizes.vocab = integer(s, "vocab", "sizes", 1, 1 << 24);
    c.sizes.embed_dim = integer(s, "embed_dim", "sizes", 1, 1 << 16);
    c.sizes.d_model = integer(s, "d_model", "sizes", 1, 1 << 16);
    c.sizes.heads = integer(s, "heads", "sizes", 1, 1024);
    c.sizes.blocks = integer(s, "blocks", "sizes", 1, 1024);
    c.sizes.experts = integer(s, "experts", "sizes", 1, router::max_experts);
    c.sizes.d_ff = integer(s, "d_ff", "sizes", 1, 1 << 20);
    c.sizes.shared_experts = integer(s, "shared_experts", "sizes", 0, 64);
    c.sizes.time_dim = integer(s, "time_dim", "sizes", 2, 1 << 16);
    std::string const act = text(j, "activation", "the top level");
    DRDIFF_CHECK(act == "gelu" || act == "swiglu", "config.json: activation = '", act, "' is not gelu or swiglu");
    c.activation = act == "gelu" ? ffn_activation::gelu : ffn_activation::swiglu;
    c.rope_base = number(j, "rope_base", "the top level");
    double const eps = number(j, "norm_eps", "the top level");
    c.norm_eps = float(eps);
    DRDIFF_CHECK(std::isfinite(c.norm_eps) && c.norm_eps > 0.f, "config.json: norm_eps = ", eps,
                 " must be > 0 and finite as a float");
    std::string const pred = text(j, "prediction", "the top level");
    DRDIFF_CHECK(pred == "embedding" || pred == "categorical", "config.json: prediction = '", pred,
                 "' is not embedding or categorical");
    c.output = pred == "embedding" ? prediction::embedding : prediction::categorical;
    // Optional (absent: false), so the files written before it stay valid.
    c.sizes.self_condition = j.contains("self_condition") && boolean(j, "self_condition", "the top level");

    json const& r = need(j, "router", "the top level");
    only_keys(r, "router", {"kind", "k", "renormalize"});
    DRDIFF_CHECK(text(r, "kind", "router") == "top_k", "config.json: router.kind = '", r.at("kind").get<std::string>(),
                 "' is not top_k (the only router a model directory names so far)");
    c.router.k = integer(r, "k", "router", 1, router::max_experts);
    c.router.renormalize = boolean(r, "renormalize", "router");

    json const& a = need(j, "attention", "the top level");
    only_keys(a, "attention", {"kind", "tiers"});
    DRDIFF_CHECK(text(a, "kind", "attention") == "hsa", "config.json: attention.kind = '",
                 a.at("kind").get<std::string>(), "' is not hsa");
    json const& tiers = need(a, "tiers", "attention");
    DRDIFF_CHECK(tiers.is_array() && !tiers.empty() && tiers.size() <= std::size_t(attn::hsa::max_tiers),
                 "config.json: attention.tiers must be an array of 1..", attn::hsa::max_tiers, " tiers");
    c.attention.num_tiers = int(tiers.size());
    for (std::size_t i = 0; i < tiers.size(); ++i) {
      json const& t = tiers[i];
      std::string const where = "attention.tiers[" + std::to_string(i) + "]";
      only_keys(t, where.c_str(), {"max_len", "dense", "window", "rate", "span", "globals"});
      attn::hsa_tier& h = c.attention.tiers[i];
      h = attn::hsa_tier{};
      h.max_len = integer(t, "max_len", where.c_str(), 1, INT_MAX);
      h.dense = boolean(t, "dense", where.c_str());
      h.window = integer(t, "window", where.c_str(), 0, INT_MAX);
      h.rate = integer(t, "rate", where.c_str(), 1, INT_MAX);
      h.span = integer(t, "span", where.c_str(), 0, INT_MAX);
      json const& g = need(t, "globals", where.c_str());
      std::string const gw = where + ".globals";
      only_keys(g, gw.c_str(), {"rule", "count", "sqrt_cap"});
      std::string const rule = text(g, "rule", gw.c_str());
      DRDIFF_CHECK(rule == "none" || rule == "first" || rule == "strided", "config.json: ", gw, ".rule = '", rule,
                   "' is not none, first or strided");
      h.globals.rule = rule == "none" ? attn::global_rule::none
                       : rule == "first" ? attn::global_rule::first
                                         : attn::global_rule::strided;
      h.globals.count = integer(g, "count", gw.c_str(), 0, INT_MAX);
      h.globals.sqrt_cap = integer(g, "sqrt_cap", gw.c_str(), 0, 46341);
      DRDIFF_CHECK(i == 0 || h.max_len > c.attention.tiers[i - 1].max_len, "config.json: ", where, ".max_len = ",
                   h.max_len, " must be above the previous tier's ", c.attention.tiers[i - 1].max_len);
    }

    json const& sc = need(j, "schedule", "the top level");
    only_keys(sc, "schedule", {"kind", "delta"});
    DRDIFF_CHECK(text(sc, "kind", "schedule") == "sqrt", "config.json: schedule.kind = '",
                 sc.at("kind").get<std::string>(), "' is not sqrt (the schedule the trainer uses)");
    c.schedule.delta = number(sc, "delta", "schedule");
    DRDIFF_CHECK(c.schedule.delta > 0 && c.schedule.delta < 0.5, "config.json: schedule.delta = ", c.schedule.delta,
                 " must be in (0, 0.5)");

    json const& sm = need(j, "sampling", "the top level");
    only_keys(sm, "sampling", {"solver", "steps", "t_start", "t_end", "spacing", "rounding"});
    std::string const sol = text(sm, "solver", "sampling");
    DRDIFF_CHECK(sol == "ddim" || sol == "2m" || sol == "3m", "config.json: sampling.solver = '", sol,
                 "' is not ddim, 2m or 3m");
    c.solver.order = sol == "ddim" ? 1 : sol == "2m" ? 2 : 3;
    c.steps = integer(sm, "steps", "sampling", 1, 1000);
    c.t_start = number(sm, "t_start", "sampling");
    c.t_end = number(sm, "t_end", "sampling");
    std::string const sp = text(sm, "spacing", "sampling");
    DRDIFF_CHECK(sp == "uniform_t" || sp == "uniform_lambda", "config.json: sampling.spacing = '", sp,
                 "' is not uniform_t or uniform_lambda");
    c.spacing = sp == "uniform_t" ? solver::spacing::uniform_t : solver::spacing::uniform_lambda;
    std::string const rd = text(sm, "rounding", "sampling");
    DRDIFF_CHECK(rd == "dot" || rd == "l2", "config.json: sampling.rounding = '", rd, "' is not dot or l2");
    c.rounding = rd == "dot" ? anchor::metric::dot : anchor::metric::l2;

    json const& tk = need(j, "tokenizer", "the top level");
    only_keys(tk, "tokenizer", {"kind", "file"});
    tokenizer_kind = text(tk, "kind", "tokenizer");
    DRDIFF_CHECK(tokenizer_kind == "sentencepiece" || tokenizer_kind == "bytes" || tokenizer_kind == "vocab-json",
                 "config.json: tokenizer.kind = '", tokenizer_kind, "' is not sentencepiece, bytes or vocab-json");
    if (tokenizer_kind == "bytes") {
      DRDIFF_CHECK(!tk.contains("file"), "config.json: tokenizer.kind = bytes takes no file");
      DRDIFF_CHECK(c.sizes.vocab == 256, "config.json: the byte tokenizer needs sizes.vocab = 256, not ",
                   c.sizes.vocab);
    } else {
      tokenizer_file = file_name(tk, "file", "tokenizer");
    }
    weights_file = file_name(j, "weights", "the top level");
    c.validate();
  }
};

DRDIFF_NAMESPACE_END
