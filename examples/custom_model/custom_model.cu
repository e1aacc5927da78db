// The same user-defined model (custom_parts.hpp) on the GPU: the weights are built on the host, the
// GPU model uploads them, its forward pass is compared with the CPU model's, and it generates.
//
//   drdiff-custom-model-cuda [length]

#include "../cli_support.hpp"

#include "custom_parts.hpp"

#include <drdiff/cpu/model.hpp>
#include <drdiff/cuda.cuh>
#include <drdiff/cuda/model.cuh>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <thrust/copy.h>
#include <thrust/device_vector.h>

using namespace drdiff;

using my_config = model_config<custom::paragraphs, custom::threshold_router>;

int main(int argc, char** argv) {
  int length = 4000;
  CLI::App app{"drdiff-custom-model-cuda: the custom model on the GPU against the CPU, then generating",
               "drdiff-custom-model-cuda"};
  app.option_defaults()->always_capture_default();
  app.add_option("length", length, "tokens to generate")->check(drdiff::examples::integer_in(1, 1 << 20));
  drdiff::examples::parse_or_exit(app, argc, argv);
  if (length < 1) {
    std::fprintf(stderr, "usage: drdiff-custom-model-cuda [length >= 1]\n");
    return 2;
  }
  if (cuda_device_count() == 0) {
    std::printf("no CUDA device: nothing to run\n");
    return 0;
  }
  try {
    my_config c;
    c.sizes = {256, 32, 256, 4, 4, 8, 512, 0, 64};
    c.router = {0.25f, 3};
    model<cpu, my_config> host(c);
    host.init_random(7);
    model<drdiff::cuda, my_config> dev(c, host.weights());

    // The GPU forward pass (bf16) against the CPU one (fp32) on one input.
    int const n = 1000;
    std::size_t const elems = std::size_t(n) * c.sizes.embed_dim;
    std::vector<float> x(elems), want(elems), got(elems);
    for (std::size_t i = 0; i < elems; ++i) x[i] = float(std::sin(0.37 * double(i)));
    host.forward(context<cpu>{}, x.data(), 0.5, want.data(), 1, n);
    thrust::device_vector<float> dx(x.begin(), x.end()), dy(elems);  // device memory owned by Thrust
    dev.forward(context<drdiff::cuda>{}, thrust::raw_pointer_cast(dx.data()), 0.5, thrust::raw_pointer_cast(dy.data()), 1,
                n);
    thrust::copy(dy.begin(), dy.end(), got.begin());
    // bf16 arithmetic, and a token whose router probabilities sit at the threshold may pick another
    // expert set: report the share of tokens within 3e-2 of the largest output, and the worst one.
    double mag = 0;
    for (float w : want) mag = std::max(mag, double(std::abs(w)));
    int close = 0;
    double worst = 0;
    int const de = c.sizes.embed_dim;
    for (int t = 0; t < n; ++t) {
      double e = 0;
      for (int k = 0; k < de; ++k) e = std::max(e, double(std::abs(got[std::size_t(t) * de + k] - want[std::size_t(t) * de + k])));
      close += e <= 3e-2 * mag;
      worst = std::max(worst, e / mag);
    }
    std::printf("GPU forward vs CPU forward at N = %d: %.1f %% of tokens within 3e-2 (worst %.2e, relative to the "
                "largest output)\n", n, 100.0 * close / n, worst);

    generation_request r;
    r.length = length;
    r.seed = 3;
    r.time_components = true;
    auto const g = dev.generate(context<drdiff::cuda>{}, r);
    std::printf("generated %d tokens on the GPU in %.3f s (%.0f tokens/s): attention %.3f s, MoE %.3f s, dense %.3f s\n",
                int(g.tokens.size()), g.seconds, g.tokens.size() / g.seconds, g.timing.attention, g.timing.moe,
                g.timing.dense);
  } catch (drdiff::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
