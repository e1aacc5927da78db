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
  if (s.self_condition) add("up_sc.weight", {dm, de}, init::zeros);  // zero: the same function as without
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

namespace detail {
/// Points a routed-FFN argument struct (router::moe_args<T>, either backend) at the expert tensors of
/// block `pre` ("blocks.<b>.") and sets its sizes; `mat(name)` and
/// `vec(name)` return the backend's pointer to a matrix or a vector. The tensor names are the ones
/// parameter_specs lists above. The activation enum and the buffers stay with the caller.
template <class Args, class Mat, class Vec>
void bind_moe_weights(Args& a, std::string const& pre, model_sizes const& s, ffn_activation act, Mat&& mat,
                      Vec&& vec) {
  a.d_model = s.d_model;
  a.d_ff = s.d_ff;
  a.experts = s.experts;
  a.w_router = mat(pre + "moe.router.weight");
  a.b_router = vec(pre + "moe.router.bias");
  a.w_up = mat(pre + "moe.experts.up");
  a.w_down = mat(pre + "moe.experts.down");
  bool const swiglu = act == ffn_activation::swiglu;
  if (swiglu) a.w_gate = mat(pre + "moe.experts.gate");
  a.shared_experts = s.shared_experts;
  if (s.shared_experts > 0) {
    a.w_shared_up = mat(pre + "moe.shared.up");
    a.w_shared_down = mat(pre + "moe.shared.down");
    if (swiglu) a.w_shared_gate = mat(pre + "moe.shared.gate");
  }
}
}  // namespace detail

DRDIFF_NAMESPACE_END
