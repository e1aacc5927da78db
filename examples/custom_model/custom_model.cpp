// A DrDiff model assembled from user-defined parts (custom_parts.hpp) on the CPU: checks the policy
// against the float64 reference, generates, and prints the timing. docs/model.md walks through it.
//
//   drdiff-custom-model [length]

#include "../cli_support.hpp"

#include "custom_parts.hpp"

#include <drdiff/cpu/attention_reference.hpp>
#include <drdiff/cpu/model.hpp>
#include <drdiff/model/tokenizer.hpp>

#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

using namespace drdiff;

using my_config = model_config<custom::paragraphs, custom::threshold_router>;

my_config make_config() {
  my_config c;
  c.sizes = {256, 32, 256, 4, 4, 8, 512, 0, 64};  // V, d_e, d_model, heads, blocks, experts, d_ff, shared, time_dim
  c.router = {0.25f, 3};
  c.steps = 12;
  return c;
}

int main(int argc, char** argv) {
  int length = 700;
  CLI::App app{"drdiff-custom-model: a model from user-defined parts, checked against the reference, then "
               "generating", "drdiff-custom-model"};
  app.option_defaults()->always_capture_default();
  app.add_option("length", length, "tokens to generate")->check(drdiff::examples::integer_in(1, 1 << 20));
  drdiff::examples::parse_or_exit(app, argc, argv);
  if (length < 1) {
    std::fprintf(stderr, "usage: drdiff-custom-model [length >= 1]\n");
    return 2;
  }
  try {
    // 1. The policy gives the same attention as the float64 reference (N not a multiple of 64).
    int const n = 777, heads = 2, dim = 64;
    std::vector<float> q(std::size_t(n) * heads * dim), k(q.size()), v(q.size()), o(q.size()), ref(q.size());
    std::mt19937 rng(1);
    std::normal_distribution<float> nd(0.f, 1.f);
    for (auto* t : {&q, &k, &v})
      for (auto& e : *t) e = nd(rng);
    attention(context<cpu>{}, custom::paragraphs{}, make_attention_args(q.data(), k.data(), v.data(), o.data(), 1, n, heads, dim));
    attention_reference(custom::paragraphs{}, make_attention_args(q.data(), k.data(), v.data(), ref.data(), 1, n, heads, dim));
    double err = 0;
    for (std::size_t i = 0; i < o.size(); ++i) err = std::max(err, double(std::abs(o[i] - ref[i])));
    std::printf("paragraphs policy vs the float64 reference at N = %d: max error %.2e\n", n, err);

    // 2. The model type from the config struct; random weights; generation after a prompt.
    model<cpu, my_config> m(make_config());
    m.init_random(7);
    byte_tokenizer tok;
    generation_request r;
    r.prompt = tok.encode("A prompt that every paragraph can see. ");
    r.length = length;
    r.seed = 3;
    auto const g = m.generate(context<cpu>{}, r);
    std::printf("generated %d tokens in %.3f s (%.0f tokens/s): attention %.3f s, MoE %.3f s, dense %.3f s\n",
                int(g.tokens.size()), g.seconds, g.tokens.size() / g.seconds, g.timing.attention, g.timing.moe,
                g.timing.dense);
    return err <= 1e-4 ? 0 : 1;
  } catch (drdiff::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
}
