#pragma once
/// \file
/// The model's tensors: names and shapes (docs/weights.md), the same on every backend, so a
/// PyTorch module with these names can export weights for DrDiff through safetensors.

#include <drdiff/model/config.hpp>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

struct parameter_spec {
  std::string name;
  std::vector<std::int64_t> shape;
  enum class init { normal, zeros, ones } how = init::normal;
  double stddev = 0.02;  ///< for init::normal

  std::int64_t elements() const noexcept {
    std::int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
};

/// Every tensor of a model of these sizes, in a fixed order.
inline std::vector<parameter_spec> parameter_specs(model_sizes const& s, ffn_activation act) {
  using init = parameter_spec::init;
  std::int64_t const V = s.vocab, de = s.embed_dim, dm = s.d_model, E = s.experts, ff = s.d_ff, td = s.time_dim;
  std::vector<parameter_spec> p;
  auto add = [&](std::string n, std::vector<std::int64_t> shape, init how = init::normal, double sd = 0.02) {
    p.push_back({std::move(n), std::move(shape), how, sd});
  };
  add("embed.weight", {V, de}, init::normal, 1.0);
  add("absorbing", {de}, init::zeros);
  add("up.weight", {dm, de}, init::normal, 1.0 / std::sqrt(double(de)));
  add("up.bias", {dm}, init::zeros);
  add("time.fc1.weight", {dm, td}, init::normal, 1.0 / std::sqrt(double(td)));
  add("time.fc1.bias", {dm}, init::zeros);
  add("time.fc2.weight", {dm, dm});
  add("time.fc2.bias", {dm}, init::zeros);
  for (int b = 0; b < s.blocks; ++b) {
    std::string const pre = "blocks." + std::to_string(b) + ".";
    add(pre + "norm1.weight", {dm}, init::ones);
    add(pre + "norm1.bias", {dm}, init::zeros);
    add(pre + "attn.qkv.weight", {3 * dm, dm});
    add(pre + "attn.out.weight", {dm, dm});
    add(pre + "norm2.weight", {dm}, init::ones);
    add(pre + "norm2.bias", {dm}, init::zeros);
    add(pre + "moe.router.weight", {E, dm});
    add(pre + "moe.router.bias", {E}, init::zeros);
    add(pre + "moe.experts.up", {E, ff, dm});
    if (act == ffn_activation::swiglu) add(pre + "moe.experts.gate", {E, ff, dm});
    add(pre + "moe.experts.down", {E, dm, ff});
    if (s.shared_experts > 0) {
      std::int64_t const S = s.shared_experts;
      add(pre + "moe.shared.up", {S, ff, dm});
      if (act == ffn_activation::swiglu) add(pre + "moe.shared.gate", {S, ff, dm});
      add(pre + "moe.shared.down", {S, dm, ff});
    }
  }
  add("norm.weight", {dm}, init::ones);
  add("norm.bias", {dm}, init::zeros);
  add("down.weight", {de, dm});
  add("down.bias", {de}, init::zeros);
  return p;
}

DRDIFF_NAMESPACE_END
