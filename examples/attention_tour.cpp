// A tour of every attention pattern on the CPU: time, useful GFLOP/s and the error against the
// float64 reference, at N = 4096, 4 heads, head_dim 64.
//
//   drdiff-attention-tour [N]

#include "cli_support.hpp"

#include "example_support.hpp"

#include <cstdio>
#include <cstdlib>
#include <string>

namespace {

template <class Policy>
void tour(char const* name, Policy const& policy, example::tensors& t, int n) {
  drdiff::context<drdiff::cpu> const ctx{};
  std::vector<unsigned char> ws(drdiff::attention_workspace_bytes(ctx, policy, t.args));
  drdiff::attention(ctx, policy, t.args, ws.data(), ws.size());  // warm-up
  double const s = example::median_seconds(5, [&] { drdiff::attention(ctx, policy, t.args, ws.data(), ws.size()); });
  double const pairs = double(drdiff::attn::allowed_pairs(policy, n, t.args.heads));
  double const gflops = 4.0 * t.args.head_dim * pairs / s * 1e-9;
  drdiff::attention_reference(policy, t.ref_args);
  std::printf("%-34s %10.2f %8.4f %10.1f %12.2e\n", name, s * 1e3, pairs / (double(n) * n * t.args.heads), gflops,
              t.rel_error(0, n));
}

}  // namespace

int main(int argc, char** argv) {
  int n = 4096;
  CLI::App app{"drdiff-attention-tour: every attention pattern at one length (time, density, useful GFLOP/s, "
               "error against the float64 reference)", "drdiff-attention-tour"};
  app.option_defaults()->always_capture_default();
  app.add_option("N", n, "sequence length")->check(drdiff::examples::integer_in(64, 1 << 20));
  drdiff::examples::parse_or_exit(app, argc, argv);
  int const heads = 4, dim = 64;
  example::tensors t(1, n, heads, dim, 2026);
  std::printf("DrDiff %s attention tour: N = %d, heads = %d, head_dim = %d, float, %d threads\n",
              DRDIFF_VERSION_STRING, n, heads, dim, drdiff::detail::resolve_threads(0));
  std::printf("%-34s %10s %8s %10s %12s\n", "pattern", "time ms", "density", "GFLOP/s", "rel. error");
  using namespace drdiff::attn;
  int const per_head[] = {2, 4, 8, 16};
  int const scattered[] = {0, 17, 511, 1024, 2000, 3071};
  try {
    tour("dense", dense{}, t, n);
    tour("local window w=256", local_window{256}, t, n);
    tour("dilated d=4 s=2048", dilated{4, 2048}, t, n);
    tour("dilated per head d=2,4,8,16", dilated{4, 2048, per_head}, t, n);
    tour("global: first 64", global_tokens::first(64), t, n);
    tour("global: 64 strided", global_tokens::strided(64), t, n);
    tour("global: explicit list of 6", global_tokens::explicit_list(scattered, 6), t, n);
    tour("union local+dilated+global", local_window{256} | dilated{4, 2048} | global_tokens::first(64), t, n);
    tour("union local+2 dilations", local_window{128} | dilated{2, 512} | dilated{16, 2048}, t, n);
    tour("hsa (default tiers)", hsa{}, t, n);
  } catch (drdiff::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
