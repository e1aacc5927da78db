// drdiff-generate: text generation with a DrDiff model on the CPU or, when built with nvcc (CMake
// compiles this file as CUDA when the toolkit is found), on the GPU.
//
//   drdiff-generate [--preset tiny|small|base | --weights FILE] [--length N] [--steps S]
//                   [--solver ddim|2m|3m] [--seed S] [--prompt TEXT] [--vocab FILE.json]
//                   [--guidance] [--threads T] [--backend cpu|cuda] [--save-weights FILE]
//                   [--progress] [--timing] [--raw]
//
// Without --weights the preset's weights are random from --seed (the library ships no trained
// weights), so the text is noise; the run still exercises the whole pipeline and reports its speed.

#include <drdiff/cpu/model.hpp>
#include <drdiff/model/tokenizer.hpp>
#if defined(__CUDACC__)
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/model.cuh>
#endif

#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

using namespace drdiff;

namespace {

struct options {
  std::string preset = "small", weights, solver = "2m", prompt, vocab, backend = "cpu", save;
  int length = 256, steps = 0, threads = 0;
  unsigned long long seed = 0;
  bool guidance = false, progress = false, raw = false, timing = false;
};

char const* usage =
    "usage: drdiff-generate [--preset tiny|small|base | --weights FILE] [--length N] [--steps S]\n"
    "                       [--solver ddim|2m|3m] [--seed S] [--prompt TEXT] [--vocab FILE.json]\n"
    "                       [--guidance] [--threads T] [--backend cpu|cuda] [--save-weights FILE]\n"
    "                       [--progress] [--timing] [--raw]\n"
    "--timing: on the GPU, time each component with CUDA events (synchronises; slower)\n";

[[noreturn]] void bad(std::string const& msg) {
  std::fprintf(stderr, "drdiff-generate: %s\n%s", msg.c_str(), usage);
  std::exit(2);
}

long long integer(std::string const& opt, char const* v, long long lo, long long hi) {
  char* end = nullptr;
  errno = 0;
  long long const x = std::strtoll(v, &end, 10);
  if (errno || end == v || *end != '\0') bad(opt + " needs an integer, got '" + v + "'");
  if (x < lo || x > hi) bad(opt + " = " + v + " is outside " + std::to_string(lo) + ".." + std::to_string(hi));
  return x;
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    std::string const a = argv[i];
    auto value = [&]() -> char const* {
      if (i + 1 >= argc) bad(a + " needs a value");
      return argv[++i];
    };
    if (a == "--help" || a == "-h") {
      std::fputs(usage, stdout);
      std::exit(0);
    } else if (a == "--preset") o.preset = value();
    else if (a == "--weights") o.weights = value();
    else if (a == "--length") o.length = int(integer(a, value(), 1, 1 << 20));
    else if (a == "--steps") o.steps = int(integer(a, value(), 1, 1000));
    else if (a == "--solver") o.solver = value();
    else if (a == "--seed") o.seed = (unsigned long long)integer(a, value(), 0, (1ll << 62));
    else if (a == "--prompt") o.prompt = value();
    else if (a == "--vocab") o.vocab = value();
    else if (a == "--guidance") o.guidance = true;
    else if (a == "--threads") o.threads = int(integer(a, value(), 0, 1024));
    else if (a == "--backend") o.backend = value();
    else if (a == "--save-weights") o.save = value();
    else if (a == "--progress") o.progress = true;
    else if (a == "--raw") o.raw = true;
    else if (a == "--timing") o.timing = true;
    else bad("unknown option '" + a + "'");
  }
  if (o.preset != "tiny" && o.preset != "small" && o.preset != "base") bad("--preset '" + o.preset + "' is not tiny, small or base");
  if (o.solver != "ddim" && o.solver != "2m" && o.solver != "3m") bad("--solver '" + o.solver + "' is not ddim, 2m or 3m");
  if (o.backend != "cpu" && o.backend != "cuda") bad("--backend '" + o.backend + "' is not cpu or cuda");
  return o;
}

std::string printable(std::string const& s) {
  std::string o;
  for (unsigned char c : s) {
    if (c == '\\') {
      o += "\\\\";  // a backslash, doubled so that escapes stay unambiguous
    } else if (c == '\n' || (c >= 0x20 && c < 0x7f)) {
      o += char(c);
    } else {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", c);
      o += buf;
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
    auto cfg = o.preset == "tiny" ? presets::tiny() : o.preset == "small" ? presets::small() : presets::base();
    if (o.steps) cfg.steps = o.steps;
    cfg.solver.order = o.solver == "ddim" ? 1 : o.solver == "2m" ? 2 : 3;
    cfg.guidance = o.guidance;
    if (o.guidance) cfg.guidance_schedule.lambda_min = 1.5;
    byte_tokenizer bytes;
    vocab_tokenizer vocab;
    bool const use_vocab = !o.vocab.empty();
    if (use_vocab) {
      vocab = vocab_tokenizer::from_file(o.vocab);
      cfg.sizes.vocab = vocab.vocab();
    }
    model<cpu, model_config<>> m(cfg);
    if (o.weights.empty()) m.init_random(o.seed);
    else m.load(o.weights);
    if (!o.save.empty()) m.save(o.save);
    generation_request req;
    req.prompt = use_vocab ? vocab.encode(o.prompt) : bytes.encode(o.prompt);
    req.length = o.length;
    req.seed = o.seed;
    bool const bar = o.progress || isatty(STDERR_FILENO);
    auto const start = std::chrono::steady_clock::now();
    if (bar)
      req.progress = [&](int step, int steps) {
        double const el = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        double const eta = el / step * (steps - step);
        int const width = 30, done = width * step / steps;
        std::fprintf(stderr, "\r[%.*s%*s] step %d/%d  elapsed %.1f s  ETA %.1f s ", done,
                     "##############################", width - done, "", step, steps, el, eta);
        if (step == steps) std::fputc('\n', stderr);
        std::fflush(stderr);
      };
    std::fprintf(stderr, "drdiff-generate: %s, preset %s (%lld active parameters), %d + %d tokens, %d steps of %s\n",
                 o.backend.c_str(), o.preset.c_str(), (long long)cfg.sizes.active_parameters(cfg.router.k), int(req.prompt.size()), o.length,
                 cfg.steps, o.solver.c_str());
    generation_result r;
    if (o.backend == "cpu") {
      r = m.generate(context<cpu>{o.threads}, req);
    } else {
#if defined(__CUDACC__)
      DRDIFF_CHECK(cuda_device_count() > 0, "drdiff-generate: --backend cuda: no CUDA device found");
      model<drdiff::cuda, model_config<>> g(cfg, m.weights());
      r = g.generate(req, o.timing);
#endif
    }
    std::string const text = use_vocab ? vocab.decode(r.tokens) : bytes.decode(r.tokens);
    std::fputs((o.raw ? text : printable(text)).c_str(), stdout);
    std::fputc('\n', stdout);
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
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
