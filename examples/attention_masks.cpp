// Draws the mask of every built-in pattern as text, at a small N with scaled-down parameters, and
// the pass that owns each pair of the union (R: global rows, W: window, D: dilation, K: global
// keys). The pictures in docs/attention.md are this program's output.
//
//   drdiff-attention-masks [N]

#include "cli_support.hpp"

#include <drdiff/attention/policies.hpp>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace {

template <class Policy>
void draw(char const* title, Policy const& policy, int n) {
  auto const p = drdiff::attn::bind(policy, n, 0);
  std::printf("%s (N = %d, density %.3f)\n", title, n, drdiff::attn::density(policy, n));
  for (int i = 0; i < n; ++i) {
    for (int j = 0; j < n; ++j) std::putchar(p.mask(i, j) ? '#' : '.');
    std::putchar('\n');
  }
  std::putchar('\n');
}

void draw_passes(char const* title, drdiff::attn::sparse_union const& u, int n) {
  auto const p = u.bind(n, 0).tiles(8);  // the segment path in query tiles of 8 rows
  std::vector<char> owner(std::size_t(n) * n, '.');
  char const letters[] = {'A', 'R', 'W', 'D', 'K'};  // by pass_kind
  for (int pass = 0; pass < p.num_passes(); ++pass)
    for (int t = 0; t < p.num_q_tiles(pass); ++t) {
      auto const rows = p.q_tile(pass, t);
      p.for_each_segment(pass, t, [&](drdiff::attn::index_range keys, bool) {
        for (int r = 0; r < rows.count; ++r)
          for (int c = 0; c < keys.count; ++c)
            if (p.owns(pass, rows[r], keys[c]))
              owner[std::size_t(rows[r]) * n + keys[c]] = letters[int(p.kind(pass))];
      });
    }
  std::printf("%s: the pass that owns each pair (N = %d)\n", title, n);
  for (int i = 0; i < n; ++i) std::printf("%.*s\n", n, &owner[std::size_t(i) * n]);
  std::putchar('\n');
}

}  // namespace

/// --dump-hsa N FILE: the default attn::hsa{} mask at length N (head 0), row-major N×N bits, the
/// least significant bit first (numpy.unpackbits(..., bitorder="little")): the oracle the PyTorch
/// side's FlexAttention block masks are checked against (python/tests/test_masks.py).
int dump_hsa(int n, char const* path) {
  if (n < 1 || n > 65536) {
    std::fprintf(stderr, "drdiff-attention-masks: --dump-hsa N = %d is outside 1..65536\n", n);
    return 2;
  }
  drdiff::attn::hsa const h{};
  h.validate(n, 1);
  auto const p = h.bind(n, 0);
  std::vector<unsigned char> bits((std::size_t(n) * n + 7) / 8, 0);
  for (int i = 0; i < n; ++i)
    for (int j = 0; j < n; ++j)
      if (p.mask(i, j)) {
        std::size_t const b = std::size_t(i) * n + j;
        bits[b / 8] |= (unsigned char)(1u << (b % 8));
      }
  std::FILE* f = std::fopen(path, "wb");
  if (!f || std::fwrite(bits.data(), 1, bits.size(), f) != bits.size() || std::fclose(f) != 0) {
    std::fprintf(stderr, "drdiff-attention-masks: cannot write '%s'\n", path);
    return 1;
  }
  return 0;
}

int main(int argc, char** argv) {
  int n = 40;
  std::vector<std::string> dump;
  CLI::App app{"drdiff-attention-masks: the masks as text, and which pass owns each pair of a union",
               "drdiff-attention-masks"};
  app.option_defaults()->always_capture_default();
  app.add_option("N", n, "sequence length of the pictures")->check(drdiff::examples::integer_in(1, 400));
  app.add_option("--dump-hsa", dump, "N FILE: write the default hsa{} mask at length N as bits and exit")
      ->expected(2)
      ->type_name("N FILE");
  drdiff::examples::parse_or_exit(app, argc, argv);
  if (!dump.empty()) {
    std::string v = dump[0];
    std::string const why = drdiff::examples::integer_in(1, 65536)(v);
    if (!why.empty()) {
      std::fprintf(stderr, "drdiff-attention-masks: --dump-hsa N %s\n", why.c_str());
      return 2;
    }
    return dump_hsa(std::atoi(dump[0].c_str()), dump[1].c_str());
  }
  using namespace drdiff::attn;
  draw("dense", dense{}, n);
  draw("local_window{3}", local_window{3}, n);
  draw("dilated{4, 16}", dilated{4, 16}, n);
  draw("global_tokens::first(2)", global_tokens::first(2), n);
  draw("global_tokens::strided(4)", global_tokens::strided(4), n);
  auto const u = local_window{3} | dilated{4, 16} | global_tokens::first(2);
  draw("local_window{3} | dilated{4, 16} | global_tokens::first(2)", u, n);
  draw_passes("the same union", u, n);
  return 0;
}
