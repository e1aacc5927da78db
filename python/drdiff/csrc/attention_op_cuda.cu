// The CUDA side of drdiff.attention_op: HSA attention forward and backward on CUDA tensors (bf16, fp16,
// fp32) through drdiff::attention and drdiff::attention_backward (cuda/attention.cuh,
// cuda/attention_backward.cuh), on PyTorch's current stream, with workspaces from PyTorch's caching
// allocator. Built with nvcc by torch.utils.cpp_extension.load when the first CUDA tensor comes
// (python/drdiff/attention_op.py). The lse is float32 for every dtype (the kernels keep it in fp32).

#include "attention_op_common.hpp"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <drdiff/cuda/attention.cuh>
#include <drdiff/cuda/attention_backward.cuh>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <vector>

namespace {

using drdiff_op::policy_from;
using drdiff_op::strides_of;

void check_tensor(torch::Tensor const& x, char const* name, torch::Tensor const& like) {
  TORCH_CHECK(x.is_cuda(), "drdiff.hsa_attention: ", name, " is on ", x.device(), " but q is on ", like.device());
  TORCH_CHECK(x.device() == like.device(), "drdiff.hsa_attention: ", name, " is on ", x.device(), " but q is on ",
              like.device());
  auto const t = x.scalar_type();
  TORCH_CHECK(t == torch::kBFloat16 || t == torch::kFloat16 || t == torch::kFloat32, "drdiff.hsa_attention: ", name,
              " is ", t, "; the CUDA operator takes bfloat16, float16 or float32");
  TORCH_CHECK(x.dim() == 4, "drdiff.hsa_attention: ", name, " has ", x.dim(), " dimensions; it must be [B, H, N, D]");
  TORCH_CHECK(x.sizes() == like.sizes(), "drdiff.hsa_attention: ", name, " has shape ", x.sizes(), " but q has ",
              like.sizes());
  TORCH_CHECK(t == like.scalar_type(), "drdiff.hsa_attention: ", name, " is ", t, " but q is ", like.scalar_type());
  TORCH_CHECK(x.stride(3) == 1, "drdiff.hsa_attention: ", name, " has stride ", x.stride(3),
              " in its last dimension; it must be 1 (call .contiguous())");
}

torch::Tensor lens_of(c10::optional<torch::Tensor> const& kv_lens, torch::Tensor const& q) {
  if (!kv_lens || !kv_lens->defined()) return torch::Tensor();
  auto const& l = *kv_lens;
  TORCH_CHECK(l.dim() == 1 && l.size(0) == q.size(0), "drdiff.hsa_attention: kv_lens must have shape [B] = [",
              q.size(0), "], got ", l.sizes());
  // Checked here (one small copy to the host): the kernels only keep device lengths within [0, N].
  auto const host = l.to(torch::kCPU, torch::kInt64);
  auto const lo = host.min().item<int64_t>(), hi = host.max().item<int64_t>();
  TORCH_CHECK(lo >= 0 && hi <= q.size(2), "drdiff.hsa_attention: kv_lens must lie in [0, N = ", q.size(2),
              "], got values from ", lo, " to ", hi);
  return l.to(q.device(), torch::kInt32).contiguous();
}

/// The library's element type of a PyTorch dtype.
template <class F>
void dispatch(torch::ScalarType t, F&& f) {
  if (t == torch::kBFloat16) f(__nv_bfloat16{});
  else if (t == torch::kFloat16) f(__half{});
  else f(float{});
}

template <class T>
drdiff::attention_args<T> forward_args(torch::Tensor const& q, torch::Tensor const& k, torch::Tensor const& v,
                                       torch::Tensor const& o, torch::Tensor const& lse, torch::Tensor const& lens,
                                       double scale) {
  drdiff::attention_args<T> a{};
  a.batch = int(q.size(0)); a.heads = int(q.size(1)); a.seq = int(q.size(2)); a.head_dim = int(q.size(3));
  a.q = reinterpret_cast<T const*>(q.data_ptr()); a.k = reinterpret_cast<T const*>(k.data_ptr());
  a.v = reinterpret_cast<T const*>(v.data_ptr()); a.o = reinterpret_cast<T*>(o.data_ptr());
  a.q_strides = strides_of(q); a.k_strides = strides_of(k); a.v_strides = strides_of(v); a.o_strides = strides_of(o);
  a.maybe_lse = lse.data_ptr<float>();
  a.maybe_kv_lens = lens.defined() ? lens.data_ptr<int>() : nullptr;
  a.softmax_scale = scale;
  return a;
}

drdiff::context<drdiff::cuda> context_of(torch::Tensor const& q) {
  drdiff::context<drdiff::cuda> ctx{};
  ctx.stream = at::cuda::getCurrentCUDAStream(q.device().index()).stream();
  ctx.device = q.device().index();
  return ctx;
}

torch::Tensor workspace(std::size_t bytes, torch::Tensor const& like) {
  return torch::empty({std::int64_t(std::max<std::size_t>(bytes, 1))}, like.options().dtype(torch::kUInt8));
}

}  // namespace

std::vector<torch::Tensor> hsa_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                         std::vector<int64_t> tiers, double scale,
                                         c10::optional<torch::Tensor> kv_lens) {
  check_tensor(q, "q", q);
  check_tensor(k, "k", q);
  check_tensor(v, "v", q);
  c10::cuda::CUDAGuard guard(q.device());
  auto const policy = policy_from(tiers);
  auto o = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto lse = torch::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(torch::kFloat32));
  auto const lens = lens_of(kv_lens, q);
  auto const ctx = context_of(q);
  try {
    dispatch(q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      auto const a = forward_args<T>(q, k, v, o, lse, lens, scale);
      std::size_t const bytes = drdiff::attention_workspace_bytes(ctx, policy, a);
      auto ws = workspace(bytes, q);
      drdiff::attention(ctx, policy, a, ws.data_ptr(), bytes);
    });
  } catch (drdiff::error const& e) {
    TORCH_CHECK(false, "drdiff.hsa_attention: ", e.what());
  }
  return {o, lse};
}

std::vector<torch::Tensor> hsa_attention_backward(torch::Tensor d_o, torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                                  torch::Tensor o, torch::Tensor lse, std::vector<int64_t> tiers,
                                                  double scale, c10::optional<torch::Tensor> kv_lens,
                                                  c10::optional<torch::Tensor> d_lse) {
  check_tensor(q, "q", q);
  check_tensor(k, "k", q);
  check_tensor(v, "v", q);
  check_tensor(o, "o", q);
  check_tensor(d_o, "d_o", q);
  TORCH_CHECK(lse.is_cuda() && lse.scalar_type() == torch::kFloat32 && lse.dim() == 3 && lse.is_contiguous() &&
                  lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "drdiff.hsa_attention_backward: lse must be a contiguous float32 CUDA tensor [B, H, N], got ",
              lse.sizes(), " ", lse.scalar_type());
  bool const has_dlse = d_lse && d_lse->defined();
  torch::Tensor dl;
  if (has_dlse) {
    TORCH_CHECK(d_lse->sizes() == lse.sizes(), "drdiff.hsa_attention_backward: d_lse has shape ", d_lse->sizes(),
                " but lse has ", lse.sizes());
    dl = d_lse->to(lse.device(), torch::kFloat32).contiguous();
  }
  c10::cuda::CUDAGuard guard(q.device());
  auto const policy = policy_from(tiers);
  auto dq = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto dk = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto dv = torch::empty_like(q, q.options().memory_format(torch::MemoryFormat::Contiguous));
  auto const lens = lens_of(kv_lens, q);
  auto const ctx = context_of(q);
  try {
    dispatch(q.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      drdiff::attention_backward_args<T> a{};
      a.fwd = forward_args<T>(q, k, v, o, lse, lens, scale);  // o and lse are only read here
      a.d_o = reinterpret_cast<T const*>(d_o.data_ptr());
      a.dq = reinterpret_cast<T*>(dq.data_ptr()); a.dk = reinterpret_cast<T*>(dk.data_ptr());
      a.dv = reinterpret_cast<T*>(dv.data_ptr());
      a.do_strides = strides_of(d_o); a.dq_strides = strides_of(dq); a.dk_strides = strides_of(dk);
      a.dv_strides = strides_of(dv);
      a.maybe_d_lse = has_dlse ? dl.data_ptr<float>() : nullptr;
      std::size_t const bytes = drdiff::attention_backward_workspace_bytes(ctx, policy, a);
      auto ws = workspace(bytes, q);
      drdiff::attention_backward(ctx, policy, a, ws.data_ptr(), bytes);
    });
  } catch (drdiff::error const& e) {
    TORCH_CHECK(false, "drdiff.hsa_attention_backward: ", e.what());
  }
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("hsa_attention", &hsa_attention, "HSA attention forward (CUDA): returns (o, lse float32)");
  m.def("hsa_attention_backward", &hsa_attention_backward, "HSA attention backward (CUDA): returns (dq, dk, dv)");
}
