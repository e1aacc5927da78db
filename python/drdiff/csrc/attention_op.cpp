// The C++ side of drdiff.attention_op: HSA attention forward and backward on CPU tensors through the
// library's drdiff::attention and drdiff::attention_backward (Eigen). Built by
// torch.utils.cpp_extension.load (python/drdiff/attention_op.py), which registers these functions as
// the torch.library custom ops drdiff::hsa_attention and drdiff::hsa_attention_backward.
// (attention_op_common.hpp: the tier table and the tensor layout; attention_op_cuda.cu: CUDA tensors.)

#include "attention_op_common.hpp"

#include <torch/extension.h>

#include <drdiff/cpu/attention.hpp>
#include <drdiff/cpu/attention_backward.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace {

using drdiff_op::policy_from;
using drdiff_op::strides_of;

void check_tensor(torch::Tensor const& x, char const* name, torch::Tensor const& like) {
  TORCH_CHECK(x.device().is_cpu(), "drdiff.hsa_attention: ", name, " is on ", x.device(),
              "; this build runs on CPU tensors (float32, float64)");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 || x.scalar_type() == torch::kFloat64, "drdiff.hsa_attention: ",
              name, " is ", x.scalar_type(), "; the CPU operator takes float32 or float64");
  TORCH_CHECK(x.dim() == 4, "drdiff.hsa_attention: ", name, " has ", x.dim(), " dimensions; it must be [B, H, N, D]");
  TORCH_CHECK(x.sizes() == like.sizes(), "drdiff.hsa_attention: ", name, " has shape ", x.sizes(), " but q has ",
              like.sizes());
  TORCH_CHECK(x.scalar_type() == like.scalar_type(), "drdiff.hsa_attention: ", name, " is ", x.scalar_type(),
              " but q is ", like.scalar_type());
  TORCH_CHECK(x.stride(3) == 1, "drdiff.hsa_attention: ", name, " has stride ", x.stride(3),
              " in its last dimension; it must be 1 (call .contiguous())");
}

template <class T>
drdiff::attention_args<T> forward_args(torch::Tensor const& q, torch::Tensor const& k, torch::Tensor const& v,
                                       torch::Tensor const& o, torch::Tensor const& lse, torch::Tensor const& lens,
                                       double scale) {
  drdiff::attention_args<T> a{};
  a.batch = int(q.size(0)); a.heads = int(q.size(1)); a.seq = int(q.size(2)); a.head_dim = int(q.size(3));
  a.q = q.data_ptr<T>(); a.k = k.data_ptr<T>(); a.v = v.data_ptr<T>(); a.o = o.data_ptr<T>();
  a.q_strides = strides_of(q); a.k_strides = strides_of(k); a.v_strides = strides_of(v); a.o_strides = strides_of(o);
  a.maybe_lse = lse.data_ptr<T>();
  a.maybe_kv_lens = lens.numel() ? lens.data_ptr<int>() : nullptr;
  a.softmax_scale = scale;
  return a;
}

torch::Tensor lens_of(c10::optional<torch::Tensor> const& kv_lens, torch::Tensor const& q) {
  if (!kv_lens || !kv_lens->defined()) return torch::empty({0}, torch::kInt32);
  auto const& l = *kv_lens;
  TORCH_CHECK(l.device().is_cpu() && l.dim() == 1 && l.size(0) == q.size(0), "drdiff.hsa_attention: kv_lens must be a "
              "CPU tensor of shape [B] = [", q.size(0), "], got ", l.sizes(), " on ", l.device());
  return l.to(torch::kInt32).contiguous();
}

int threads() { return at::get_num_threads(); }

}  // namespace

/// (o [B, H, N, D], lse [B, H, N]) of softmax(q·kᵀ·scale + mask)·v under the tier table.
std::vector<torch::Tensor> hsa_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         std::vector<int64_t> tiers, double scale,
                                         c10::optional<torch::Tensor> kv_lens) {
  check_tensor(q, "q", q);
  check_tensor(k, "k", q);
  check_tensor(v, "v", q);
  auto const policy = policy_from(tiers);
  auto o = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto lse = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  auto const lens = lens_of(kv_lens, q);
  try {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hsa_attention", [&] {
      drdiff::attention(drdiff::context<drdiff::cpu>{threads()}, policy,
                        forward_args<scalar_t>(q, k, v, o, lse, lens, scale));
    });
  } catch (drdiff::error const& e) {
    TORCH_CHECK(false, "drdiff.hsa_attention: ", e.what());
  }
  return {o, lse};
}

/// (dq, dk, dv) for the forward's inputs, its (o, lse), the output gradient d_o and, when the loss
/// also uses the lse, its gradient d_lse.
std::vector<torch::Tensor> hsa_attention_backward(torch::Tensor d_o, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor o, torch::Tensor lse, std::vector<int64_t> tiers,
                                                  double scale, c10::optional<torch::Tensor> kv_lens,
                                                  c10::optional<torch::Tensor> d_lse) {
  check_tensor(q, "q", q);
  check_tensor(k, "k", q);
  check_tensor(v, "v", q);
  check_tensor(o, "o", q);
  check_tensor(d_o, "d_o", q);
  TORCH_CHECK(lse.scalar_type() == q.scalar_type() && lse.dim() == 3 && lse.is_contiguous() &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "drdiff.hsa_attention_backward: lse must be a contiguous [B, H, N] tensor of q's dtype, got ",
              lse.sizes());
  bool const has_dlse = d_lse && d_lse->defined();
  if (has_dlse)
    TORCH_CHECK(d_lse->scalar_type() == lse.scalar_type() && d_lse->sizes() == lse.sizes() && d_lse->is_contiguous() &&
                    d_lse->device().is_cpu(),
                "drdiff.hsa_attention_backward: d_lse must be a contiguous CPU tensor like lse, got ", d_lse->sizes());
  auto const policy = policy_from(tiers);
  auto dq = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto dk = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto dv = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto const lens = lens_of(kv_lens, q);
  try {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "hsa_attention_backward", [&] {
      drdiff::attention_backward_args<scalar_t> a{};
      a.fwd = forward_args<scalar_t>(q, k, v, o, lse, lens, scale);  // o and lse are only read here
      a.d_o = d_o.data_ptr<scalar_t>();
      a.dq = dq.data_ptr<scalar_t>(); a.dk = dk.data_ptr<scalar_t>(); a.dv = dv.data_ptr<scalar_t>();
      a.do_strides = strides_of(d_o); a.dq_strides = strides_of(dq); a.dk_strides = strides_of(dk);
      a.dv_strides = strides_of(dv);
      a.maybe_d_lse = has_dlse ? d_lse->data_ptr<scalar_t>() : nullptr;
      drdiff::attention_backward(drdiff::context<drdiff::cpu>{threads()}, policy, a);
    });
  } catch (drdiff::error const& e) {
    TORCH_CHECK(false, "drdiff.hsa_attention_backward: ", e.what());
  }
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hsa_attention", &hsa_attention, "HSA attention forward (CPU): returns (o, lse)");
  m.def("hsa_attention_backward", &hsa_attention_backward, "HSA attention backward (CPU): returns (dq, dk, dv)");
}
