// Scaling of HSA and of the local window on the CPU from N = 1K to 64K: time, useful GFLOP/s,
// nanoseconds per (query, head), and the error against the float64 reference on sampled rows
// (the first, middle and last 64 rows). Linear cost shows as a flat ns/query column.
//
//   drdiff-attention-scaling [max_N]

#include "cli_support.hpp"

#include "example_support.hpp"

#include <cstdio>
#include <cstdlib>
#include <type_traits>

namespace {

template <class Policy>
void row(char const* name, Policy const& policy, int n) {
  int const heads = 4, dim = 64;
  example::tensors t(1, n, heads, dim, unsigned(n));
  drdiff::context<drdiff::cpu> const ctx{};
  std::vector<unsigned char> ws(drdiff::attention_workspace_bytes(ctx, policy, t.args));
  drdiff::attention(ctx, policy, t.args, ws.data(), ws.size());
  double const s = example::median_seconds(n <= 8192 ? 5 : 3, [&] {
    drdiff::attention(ctx, policy, t.args, ws.data(), ws.size());
  });
  double const pairs = double(drdiff::attn::allowed_pairs(policy, n, heads));
  double err = 0;
  for (int r0 : {0, n / 2 - 32, n - 64}) {
    drdiff::attention_reference(policy, t.ref_args, r0, r0 + 64);
    err = std::max(err, t.rel_error(r0, r0 + 64));
  }
  char tier[16] = "-";
  if constexpr (std::is_same_v<Policy, drdiff::attn::hsa>) std::snprintf(tier, sizeof tier, "%d", policy.tier_index(n));
  std::printf("%-8s %7d %5s %10.2f %9.5f %9.1f %11.1f %11.2e\n", name, n, tier, s * 1e3,
              pairs / (double(n) * n * heads), 4.0 * dim * pairs / s * 1e-9, s * 1e9 / (double(n) * heads), err);
}

}  // namespace

int main(int argc, char** argv) {
  int max_n = 65536;
  CLI::App app{"drdiff-attention-scaling: HSA and the local window from 1K tokens up (time, GFLOP/s, ns per "
               "query, error)", "drdiff-attention-scaling"};
  app.option_defaults()->always_capture_default();
  app.add_option("max_N", max_n, "the longest sequence")->check(drdiff::examples::integer_in(1024, 1 << 22));
  drdiff::examples::parse_or_exit(app, argc, argv);
  std::printf("DrDiff %s attention scaling: heads = 4, head_dim = 64, float, %d threads\n", DRDIFF_VERSION_STRING,
              drdiff::detail::resolve_threads(0));
  std::printf("%-8s %7s %5s %10s %9s %9s %11s %11s\n", "pattern", "N", "tier", "time ms", "density", "GFLOP/s",
              "ns/query", "rel. error");
  try {
    for (int n = 1024; n <= max_n; n *= 2) row("hsa", drdiff::attn::hsa{}, n);
    for (int n = 1024; n <= max_n; n *= 2) row("local", drdiff::attn::local_window{256}, n);
  } catch (drdiff::error const& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 1;
  }
  return 0;
}
