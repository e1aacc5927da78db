// drdiff-generate: text generation with a DrDiff model on the CPU or, when built with nvcc (CMake
// compiles this file as CUDA when the toolkit is found), on the GPU.
//
//   drdiff-generate --model DIR --prompt TEXT [--length N] [--steps S] [--solver ddim|2m|3m] [--seed S]
//   drdiff-generate --preset tiny|small|base [--weights FILE] ...      (random weights without --weights)
//   drdiff-generate --help                                              (every option with its default)
//
// --model DIR reads a model directory (config.json, weights, tokenizer; docs/weights.md), e.g. the
// trained models/drdiff-text. A preset without --weights has random weights from --seed, so its text
// is noise; that run still exercises the whole pipeline and reports its speed. Arguments are parsed
// by CLI11 (examples/cli_support.hpp).

#include "generate_cli.hpp"

#include <drdiff/cpu/model.hpp>
#include <drdiff/model/directory.hpp>
#include <drdiff/model/tokenizer.hpp>
#include <drdiff/model/vocab_tokenizer.hpp>
#if defined(DRDIFF_HAS_SENTENCEPIECE)
#include <drdiff/model/sentencepiece.hpp>
#endif
#if defined(__CUDACC__)
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/model.cuh>
#endif

#include <unistd.h>

#include <atomic>
#include <mutex>
#include <thread>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>

using namespace drdiff;

namespace {

using examples::generate::options;

options parse(int argc, char** argv) {
  options o;
  CLI::App app{"drdiff-generate: text generation with a DrDiff model (docs/model.md)", "drdiff-generate"};
  examples::generate::add_options(app, o);
  examples::parse_or_exit(app, argc, argv);
  std::string bad = examples::generate::conflicts(o);
  if (bad.empty() && !o.model.empty() && app.count("--preset") > 0)
    bad = "--model DIR has its own sizes: drop --preset";
  if (!bad.empty()) {
    std::fprintf(stderr, "drdiff-generate: %s\n", bad.c_str());
    std::exit(2);
  }
  return o;
}

/// The tokenizer a run uses, chosen once: bytes (no file), a JSON vocabulary, or SentencePiece.
struct codec {
  std::function<std::vector<int>(std::string const&)> encode;
  std::function<std::string(std::vector<int> const&)> decode;
  int vocab = 256;
};

codec make_codec(std::string const& kind, std::string const& path) {
  if (kind == "vocab-json") {
    auto v = std::make_shared<vocab_tokenizer>(vocab_tokenizer::from_file(path));
    return {[v](std::string const& t) { return v->encode(t); },
            [v](std::vector<int> const& ids) { return v->decode(ids); }, v->vocab()};
  }
  if (kind == "sentencepiece") {
#if defined(DRDIFF_HAS_SENTENCEPIECE)
    auto s = std::make_shared<sentencepiece_tokenizer>(sentencepiece_tokenizer::from_file(path));
    return {[s](std::string const& t) { return s->encode(t); },
            [s](std::vector<int> const& ids) { return s->decode(ids); }, s->vocab()};
#else
    DRDIFF_FAIL("drdiff-generate: ", path, " is a SentencePiece tokenizer, but this build has no SentencePiece "
                "(install libsentencepiece-dev, e.g. with scripts/install_deps.sh, and rebuild)");
#endif
  }
  byte_tokenizer const b;
  return {[b](std::string const& t) { return b.encode(t); },
          [b](std::vector<int> const& ids) { return b.decode(ids); }, b.vocab()};
}

/// The text as it can be shown on a terminal: valid UTF-8, newlines and tabs as they are; other
/// control bytes and bytes of invalid UTF-8 as \xNN (and a backslash doubled, so escapes stay unambiguous).
std::string printable(std::string const& s) {
  std::string o;
  auto hex = [&](unsigned char c) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "\\x%02x", c);
    o += buf;
  };
  for (std::size_t i = 0; i < s.size();) {
    unsigned char const c = static_cast<unsigned char>(s[i]);
    if (c == '\\') {
      o += "\\\\";
      ++i;
    } else if (c == '\n' || c == '\t' || (c >= 0x20 && c < 0x7f)) {
      o += char(c);
      ++i;
    } else if (c >= 0xc2 && c <= 0xf4) {  // a UTF-8 lead byte: keep the sequence when it is complete
      std::size_t const len = c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4;
      bool ok = i + len <= s.size();
      for (std::size_t k = 1; ok && k < len; ++k) ok = (static_cast<unsigned char>(s[i + k]) & 0xc0) == 0x80;
      if (ok) {
        o.append(s, i, len);
        i += len;
      } else {
        hex(c);
        ++i;
      }
    } else {
      hex(c);
      ++i;
    }
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  options const o = parse(argc, argv);
#if !defined(__CUDACC__)
  if (o.backend == "cuda") {
    std::fprintf(stderr, "drdiff-generate: --backend cuda: this build has no CUDA (nvcc was not found when it was "
                         "configured); use --backend cpu\n");
    return 2;
  }
#endif
  try {
    model_config<> cfg;
    model_directory dir;
    std::string tokenizer_kind = o.vocab.empty() ? "bytes" : "vocab-json";
    if (!o.model.empty()) {
      dir = model_directory::open(o.model);
      cfg = dir.config;
      tokenizer_kind = dir.tokenizer_kind;
    } else {
      cfg = o.preset == "tiny" ? presets::tiny() : o.preset == "small" ? presets::small() : presets::base();
    }
    if (o.steps) cfg.steps = o.steps;
    if (!o.solver.empty()) cfg.solver.order = o.solver == "ddim" ? 1 : o.solver == "2m" ? 2 : 3;
    char const* solver_name[] = {"", "ddim", "2m", "3m"};
    cfg.guidance = o.guidance;
    if (o.guidance) cfg.guidance_schedule.lambda_min = o.guidance_lambda;
    codec const tok = make_codec(tokenizer_kind, o.model.empty() ? o.vocab : dir.tokenizer_path());
    if (o.model.empty()) cfg.sizes.vocab = tok.vocab;
    if (o.list) {
      for (auto const& p : parameter_specs(cfg.sizes, cfg.activation)) {
        std::string shape;
        for (std::size_t i = 0; i < p.shape.size(); ++i) shape += (i ? ", " : "") + std::to_string(p.shape[i]);
        std::printf("{\"name\": \"%s\", \"shape\": [%s]}\n", p.name.c_str(), shape.c_str());
      }
      return 0;
    }
    model_weights w(cfg.sizes, cfg.activation);  // on the host; the model of either backend takes them
    if (!o.model.empty()) {
      dir.load_into(w);
      DRDIFF_CHECK(tok.vocab == cfg.sizes.vocab, "drdiff-generate: the ", tokenizer_kind, " tokenizer ",
                   dir.tokenizer_path(), " has ", tok.vocab, " tokens but config.json says sizes.vocab = ",
                   cfg.sizes.vocab);
    } else if (o.weights.empty()) {
      w.init_random(o.seed);
    } else {
      w.load(o.weights);
    }
    if (!o.save.empty()) w.save(o.save);
    generation_request req;
    req.prompt = tok.encode(o.prompt);
    req.length = o.length;
    DRDIFF_CHECK(req.prompt.size() + std::size_t(o.length) <= (std::size_t(1) << 20), "drdiff-generate: the prompt's ",
                 req.prompt.size(), " tokens and --length ", o.length, " make more than 1048576 tokens");
    req.seed = o.seed;
    // The plan, before the first model evaluation: sizes, the attention tier, the memory it needs.
    std::int64_t const N = std::int64_t(req.prompt.size()) + o.length;
    auto const& sz = cfg.sizes;
    int const tier = cfg.attention.tier_index(int(N));
    auto const& tr = cfg.attention.tiers[tier];
    std::string tier_text = "dense";
    if (!tr.dense)
      tier_text = "window " + std::to_string(tr.window) + ", dilation " + std::to_string(tr.rate) + " to " +
                  std::to_string(tr.span) + ", " + std::to_string(tr.globals.resolve(int(N))) + " global tokens";
    // Host memory of a CPU generation: the fp32 weights, the activations of one forward (h, LayerNorm,
    // attention out, FFN out, q/k/v, the routed experts' hidden rows), the attention state, the
    // solver's state and history, and the categorical prediction's logits per worker.
    double weights_bytes = 0;
    for (auto const& p : parameter_specs(sz, cfg.activation)) weights_bytes += 4.0 * double(p.elements());
    int const workers = detail::resolve_threads(o.threads);
    double const act = 4.0 * double(N) * (7.0 * sz.d_model + 2.0 * (cfg.router.k + sz.shared_experts) * sz.d_ff +
                                         6.0 * sz.embed_dim + 4.0 * sz.heads);
    double const logits = cfg.output == prediction::categorical ? 4.0 * workers * 64.0 * sz.vocab : 0.0;
    double const need = weights_bytes + act + logits;
    // What is still to be allocated (the weights are loaded by now) against the kernel's MemAvailable
    // (free memory plus reclaimable cache; not sysconf's free pages, which leave the cache out).
    double const to_come = act + logits;
    double avail = 0.0;
    if (std::FILE* mi = std::fopen("/proc/meminfo", "r")) {
      char line[256];
      while (std::fgets(line, sizeof line, mi))
        if (std::strncmp(line, "MemAvailable:", 13) == 0) avail = std::strtod(line + 13, nullptr) * 1024.0;
      std::fclose(mi);
    }
    std::string const what = o.model.empty() ? "preset " + o.preset + (o.weights.empty() ? " (random weights)" : "")
                                             : "model " + o.model;
    std::fprintf(stderr,
                 "drdiff-generate: %s, %s (%lld active parameters), %d + %d tokens, %d steps of %s\n"
                 "drdiff-generate: plan: d_model %d, %d blocks of %d heads, %d experts (top-%d), vocab %d; attention "
                 "tier %d (N = %lld: %s); memory %.1f MB (weights %.1f MB)%s\n",
                 o.backend.c_str(), what.c_str(), (long long)sz.active_parameters(cfg.router.k), int(req.prompt.size()),
                 o.length, cfg.steps, solver_name[cfg.solver.order], sz.d_model, sz.blocks, sz.heads, sz.experts,
                 cfg.router.k, sz.vocab, tier, (long long)N, tier_text.c_str(), need / 1e6, weights_bytes / 1e6,
                 avail > 0 ? (", " + std::to_string(long(avail / 1e6)) + " MB available").c_str() : "");
    std::fflush(stderr);
    if (o.max_memory_mb > 0) {  // the user's cap, below what the kernel reports
      double const cap = double(o.max_memory_mb) * 1e6;
      avail = avail > 0 ? std::min(avail, cap) : cap;
    }
    DRDIFF_CHECK(o.backend != "cpu" || avail <= 0 || to_come <= avail, "drdiff-generate: this request needs about ",
                 long(to_come / 1e6), " MB more memory (", long(need / 1e6), " MB in all, the weights included) but ",
                 long(avail / 1e6), " MB are available", o.max_memory_mb > 0 ? " (--max-memory-mb)" : "",
                 ": ask for fewer tokens (--length) or free memory");
    // The progress bar: redrawn every 0.25 s from the start (elapsed time), with the step count the
    // sampler reports after each step.
    bool const bar = o.progress || isatty(STDERR_FILENO);
    auto const start = std::chrono::steady_clock::now();
    std::atomic<int> steps_done{0};
    std::atomic<bool> finished{false};
    std::mutex draw_mutex;
    bool const on_terminal = isatty(STDERR_FILENO);
    auto draw = [&](bool last) {
      std::lock_guard<std::mutex> lock(draw_mutex);
      int const step = steps_done.load(), steps = cfg.steps;
      double const el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      int const width = 30, done = width * step / steps;
      std::fprintf(stderr, "%s[%.*s%*s] step %d/%d  elapsed %.1f s", on_terminal ? "\r" : "", done,
                   "##############################", width - done, "", step, steps, el);
      if (step > 0) std::fprintf(stderr, "  ETA %.1f s ", el / step * (steps - step));
      else std::fputs("  (first step) ", stderr);
      if (last || !on_terminal) std::fputc('\n', stderr);
      std::fflush(stderr);
    };
    std::thread ticker;
    if (bar) {
      req.progress = [&](int step, int) { steps_done.store(step); };
      // On a terminal the bar is redrawn every 0.25 s (the elapsed time moves); into a file or a
      // pipe only when a step ends, so a log holds one line per step, not four per second.
      bool const tty = on_terminal;
      ticker = std::thread([&, tty] {
        draw(false);
        int shown = 0;
        while (!finished.load()) {
          std::this_thread::sleep_for(std::chrono::milliseconds(250));
          if (finished.load()) break;
          int const now = steps_done.load();
          if (tty || now != shown) draw(false);
          shown = now;
        }
      });
    }
    struct join_on_exit {  // the ticker stops on every way out, exceptions included
      std::thread& t;
      std::atomic<bool>& f;
      ~join_on_exit() {
        f.store(true);
        if (t.joinable()) t.join();
      }
    } stop_ticker{ticker, finished};
    req.time_components = o.timing;
    // The one per-backend step: the context (the model type and its calls are the same).
    auto run = [&](auto const& ctx) {
      using backend = typename std::decay_t<decltype(ctx)>::backend_type;
      model<backend, model_config<>> m(cfg, std::move(w));
      return m.generate(ctx, req);
    };
    generation_result r;
    if (o.backend == "cpu") {
      r = run(context<cpu>{o.threads});
    } else {
#if defined(__CUDACC__)
      DRDIFF_CHECK(cuda_device_count() > 0, "drdiff-generate: --backend cuda: no CUDA device found");
      r = run(context<drdiff::cuda>{});
#endif
    }
    if (bar) {
      finished.store(true);
      if (ticker.joinable()) ticker.join();
      draw(true);
    }
    std::string const text = (o.echo ? o.prompt : std::string()) + tok.decode(r.tokens);
    std::fputs((o.raw ? text : printable(text)).c_str(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);  // the text before the statistics on stderr
    auto const& t = r.timing;
    if (o.backend == "cpu" || o.timing)
      std::fprintf(stderr,
                   "drdiff-generate: %d tokens in %.3f s = %.1f tokens/s (%d model evaluations; attention %.3f s, MoE "
                   "%.3f s, dense layers %.3f s, solver %.3f s, rounding %.3f s)\n",
                   int(r.tokens.size()), r.seconds, r.tokens.size() / r.seconds, r.evaluations, t.attention, t.moe,
                   t.dense, t.solver, t.rounding);
    else  // on the GPU the split needs CUDA events around each component (--timing), which synchronise
      std::fprintf(stderr,
                   "drdiff-generate: %d tokens in %.3f s = %.1f tokens/s (%d model evaluations; the first call "
                   "includes allocations and cuBLAS warm-up; --timing for the component split)\n",
                   int(r.tokens.size()), r.seconds, r.tokens.size() / r.seconds, r.evaluations);
  } catch (drdiff::error const& e) {
    std::fprintf(stderr, "\n%s\n", e.what());
    return 1;
  } catch (std::exception const& e) {  // e.g. std::bad_alloc: said, not std::terminate
    std::fprintf(stderr, "\ndrdiff-generate: %s\n", e.what());
    return 1;
  }
  return 0;
}
