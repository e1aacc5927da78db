#pragma once
// drdiff-generate's command line (CLI11): the options, their defaults and checks. Shared by the
// program and the fuzz target of the parser (test/fuzz/cli_fuzz.cpp).

#include "cli_support.hpp"

#include <string>

namespace drdiff::examples::generate {

struct options {
  std::string preset = "small", weights, solver, prompt, vocab, backend = "cpu", save, model;
  int length = 256, steps = 0, threads = 0;
  long long max_memory_mb = 0;
  unsigned long long seed = 0;
  bool guidance = false, progress = false, raw = false, timing = false, echo = true, list = false;
  double guidance_lambda = 0.0;
};

/// The command line of drdiff-generate into `o`: every option, its default and its check.
inline void add_options(CLI::App& app, options& o) {
  using examples::integer_in;
  using examples::one_of;
  app.option_defaults()->always_capture_default();
  app.add_option("--model", o.model, "a model directory (config.json, weights, tokenizer; docs/weights.md); "
                                     "its sampling settings are the defaults of --steps and --solver");
  app.add_option("--preset", o.preset, "without --model: the sizes of a preset (random weights unless --weights)")
      ->check(one_of({"tiny", "small", "base"}));
  app.add_option("--weights", o.weights, "with --preset: a safetensors file of that preset's tensors");
  app.add_option("--prompt", o.prompt, "text kept clean at every step; echoed before the continuation");
  app.add_option("--length,--max-new-tokens", o.length, "new tokens after the prompt")
      ->check(integer_in(1, 1 << 20));
  app.add_option("--steps", o.steps, "solver steps (0: the model's or the preset's)")->check(integer_in(0, 1000));
  app.add_option("--solver", o.solver, "DPM-Solver++ order: ddim, 2m or 3m (empty: the model's or 2m)")
      ->check(one_of({"ddim", "2m", "3m"}, true));
  app.add_option("--seed", o.seed, "the noise (same seed, same text)")->check(integer_in(0, 1ll << 62));
  app.add_option("--vocab", o.vocab, "with --preset: a JSON array of token strings instead of bytes");
  app.add_flag("--guidance", o.guidance, "clamp guidance toward the nearest embedding at the steps with "
                                         "lambda(t) >= --guidance-lambda");
  app.add_option("--guidance-lambda", o.guidance_lambda,
                 "where guidance starts, in lambda = log(alpha/sigma): 0 is t <= 0.25 on the sqrt schedule (the "
                 "last quarter of the steps); the schedule's lambda stays below 2.3, and at most 0.9 at the "
                 "predictions of a 50-step grid")
      ->check(CLI::Range(-20.0, 20.0));
  app.add_option("--threads", o.threads, "CPU workers (0: the hardware's count; more is capped at it)")
      ->check(integer_in(0, 1 << 16));
  app.add_option("--backend", o.backend, "cpu, or cuda in a build with nvcc")->check(one_of({"cpu", "cuda"}));
  app.add_option("--max-memory-mb", o.max_memory_mb, "on the CPU, refuse a request whose memory still to allocate "
                                                     "exceeds this many MB (0: the kernel's MemAvailable)")
      ->check(integer_in(0, 1ll << 40));
  app.add_option("--save-weights", o.save, "write the model's weights (F32 safetensors) to this file");
  app.add_flag("--progress", o.progress, "a progress bar on stderr (always on a terminal)");
  app.add_flag("--timing", o.timing, "on the GPU, time each component with CUDA events (synchronises; slower)");
  app.add_flag("--raw", o.raw, "print the text as it is (no \\xNN escapes for control bytes)");
  app.add_flag("!--no-echo", o.echo, "print only the continuation, not the prompt before it");
  app.add_flag("--list-tensors", o.list, "print the model's tensors (name, shape) as JSON lines and exit");
}

/// Checks across options: "" when they fit together, else what is wrong.
inline std::string conflicts(options const& o) {
  if (!o.model.empty() && (!o.weights.empty() || !o.vocab.empty()))
    return "--model DIR names its own weights and tokenizer: drop --weights and --vocab";
  return {};
}


}  // namespace drdiff::examples::generate
