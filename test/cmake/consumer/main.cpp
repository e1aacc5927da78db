#include <drdiff/drdiff.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  int const batch = 1, seq = 300, heads = 2, dim = 64;
  std::vector<float> q(std::size_t(batch) * seq * heads * dim), k(q.size()), v(q.size()), o(q.size()), o_ref(q.size());
  for (std::size_t i = 0; i < q.size(); ++i) {
    q[i] = float(std::sin(0.1 * i));
    k[i] = float(std::cos(0.07 * i));
    v[i] = float(std::sin(0.03 * i + 1));
  }
  auto args = drdiff::make_attention_args(q.data(), k.data(), v.data(), o.data(), batch, seq, heads, dim);
  auto const policy = drdiff::attn::local_window{32} | drdiff::attn::dilated{4, 128} | drdiff::attn::global_tokens::first(8);
  drdiff::attention(drdiff::context<drdiff::cpu>{}, policy, args);
  auto ref = args;
  ref.o = o_ref.data();
  drdiff::attention_reference(policy, ref);
  double err = 0;
  for (std::size_t i = 0; i < o.size(); ++i) err = std::fmax(err, std::fabs(o[i] - o_ref[i]));
  std::printf("DrDiff %s consumer: max abs error %.3g\n", DRDIFF_VERSION_STRING, err);
  return err < 1e-4 ? 0 : 1;
}
