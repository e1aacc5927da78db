#pragma once
/// \file
/// The attention backward front end: `drdiff::attention_backward(ctx, policy, args)` and its
/// workspace query. Given the forward's inputs, its output O and log-sum-exp, and dO = ∂L/∂O, it
/// writes dQ, dK and dV for the same policy, FlashAttention-2 style: D = rowsum(dO ∘ O), then for
/// each allowed pair P = exp(S − lse), dV += Pᵀ·dO, dS = P ∘ (dO·Vᵀ − D), dQ += scale·dS·K,
/// dK += scale·dSᵀ·Q. Portable; the backends specialise detail::attention_backward_impl
/// (cpu/attention_backward.hpp).

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/attention.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/core/traits.hpp>

#include <cstddef>

DRDIFF_NAMESPACE_BEGIN

/// One backward call. `fwd` holds what the forward was called with, plus its results: `fwd.o`
/// (read here, not written) and `fwd.maybe_lse`, which is required. dO, dQ, dK and dV are
/// [batch, seq, heads, head_dim] with their own strides. kv_lens and softmax_scale are the
/// forward's. `maybe_d_lse` (optional, packed [batch, heads, seq] like the lse) is ∂L/∂lse when the
/// loss also uses the log-sum-exp: it adds P·d_lse to dS. Memory is host memory for drdiff::cpu.
template <class T>
struct attention_backward_args {
  attention_args<T> fwd{};
  T const* d_o = nullptr;
  T* dq = nullptr;
  T* dk = nullptr;
  T* dv = nullptr;
  tensor_strides do_strides{}, dq_strides{}, dk_strides{}, dv_strides{};
  typename attention_args<T>::lse_type const* maybe_d_lse = nullptr;
};

/// Arguments for packed tensors of shape [batch, seq, heads, head_dim].
template <class T>
attention_backward_args<T> make_attention_backward_args(attention_args<T> const& fwd, T const* d_o, T* dq, T* dk,
                                                        T* dv) {
  attention_backward_args<T> a{};
  a.fwd = fwd;
  a.d_o = d_o; a.dq = dq; a.dk = dk; a.dv = dv;
  a.do_strides = a.dq_strides = a.dk_strides = a.dv_strides = packed_strides(fwd.seq, fwd.heads, fwd.head_dim);
  return a;
}

/// Throws drdiff::error, naming the parameter and its value, when the arguments are not usable: the
/// forward's checks, a missing lse or gradient pointer, bad strides, and gradients that overlap each
/// other or an input.
template <class T>
void validate(attention_backward_args<T> const& a, bool host_lens = true) {
  validate(a.fwd, host_lens);
  auto const& f = a.fwd;
  DRDIFF_CHECK(f.maybe_lse != nullptr, "attention_backward: fwd.maybe_lse is a null pointer (the backward needs "
               "the forward's log-sum-exp)");
  DRDIFF_CHECK(a.d_o != nullptr, "attention_backward: d_o is a null pointer");
  DRDIFF_CHECK(a.dq != nullptr, "attention_backward: dq is a null pointer");
  DRDIFF_CHECK(a.dk != nullptr, "attention_backward: dk is a null pointer");
  DRDIFF_CHECK(a.dv != nullptr, "attention_backward: dv is a null pointer");
  detail::check_strides(a.do_strides, f.batch, f.seq, f.heads, f.head_dim, "d_o", false);
  detail::check_strides(a.dq_strides, f.batch, f.seq, f.heads, f.head_dim, "dq", true);
  detail::check_strides(a.dk_strides, f.batch, f.seq, f.heads, f.head_dim, "dk", true);
  detail::check_strides(a.dv_strides, f.batch, f.seq, f.heads, f.head_dim, "dv", true);
  using span = std::pair<std::uintptr_t, std::uintptr_t>;
  auto sp = [&](void const* p, tensor_strides const& s) {
    return detail::byte_span<T>(p, s, f.batch, f.seq, f.heads, f.head_dim);
  };
  auto const l0 = reinterpret_cast<std::uintptr_t>(f.maybe_lse);
  auto const dl0 = reinterpret_cast<std::uintptr_t>(a.maybe_d_lse);
  std::uint64_t const lse_bytes = std::uint64_t(f.batch) * f.heads * f.seq * sizeof(*f.maybe_lse);
  span const in[7] = {sp(f.q, f.q_strides), sp(f.k, f.k_strides), sp(f.v, f.v_strides), sp(f.o, f.o_strides),
                      sp(a.d_o, a.do_strides), {l0, l0 + lse_bytes}, {dl0, dl0 ? dl0 + lse_bytes : dl0}};
  char const* const in_names[7] = {"q", "k", "v", "o", "d_o", "lse", "d_lse"};
  span const out[3] = {sp(a.dq, a.dq_strides), sp(a.dk, a.dk_strides), sp(a.dv, a.dv_strides)};
  char const* const out_names[3] = {"dq", "dk", "dv"};
  for (int x = 0; x < 3; ++x) {
    DRDIFF_CHECK(out[x].second >= out[x].first, "attention_backward: ", out_names[x],
                 " spans more bytes than the address space holds");
    for (int y = 0; y < 7; ++y)
      DRDIFF_CHECK(!detail::overlaps(out[x], in[y]), "attention_backward: ", out_names[x], " overlaps ", in_names[y],
                   " (gradients are written while the inputs are read)");
    for (int y = 0; y < x; ++y)
      DRDIFF_CHECK(!detail::overlaps(out[x], out[y]), "attention_backward: ", out_names[x], " overlaps ",
                   out_names[y]);
  }
}

namespace detail {
/// Primary template: exists only to fail with a readable message.
template <class Backend, class T, class = void>
struct attention_backward_impl {
  static_assert(dependent_false<Backend, T>,
                "drdiff::attention_backward: no implementation for this backend and element type. For drdiff::cpu "
                "(float, double) include <drdiff/cpu/attention_backward.hpp> (or <drdiff/drdiff.hpp>).");
};
}  // namespace detail

/// Bytes of scratch memory `attention_backward` needs for these arguments.
template <class Backend, class Policy, class T>
std::size_t attention_backward_workspace_bytes(context<Backend> const& ctx, Policy const& policy,
                                               attention_backward_args<T> const& args) {
  detail::check_policy<Policy>();
  return detail::attention_backward_impl<Backend, T>::workspace_bytes(ctx, policy, args);
}

/// dQ, dK and dV of attention with `policy` on the backend of `ctx` (overwritten, not accumulated).
/// `workspace`: caller-owned scratch of at least attention_backward_workspace_bytes(...) bytes; on
/// drdiff::cpu a null workspace makes the call allocate its own. Bad arguments throw drdiff::error
/// before any work starts. A NaN in any input reaches the gradients it touches.
template <class Backend, class Policy, class T>
void attention_backward(context<Backend> const& ctx, Policy const& policy, attention_backward_args<T> const& args,
                        void* workspace = nullptr, std::size_t workspace_bytes = 0) {
  static_assert(is_backend_v<Backend>, "drdiff::attention_backward: Backend must be drdiff::cpu or drdiff::cuda.");
  detail::check_policy<Policy>();
  detail::attention_backward_impl<Backend, T>::run(ctx, policy, args, workspace, workspace_bytes);
}

DRDIFF_NAMESPACE_END
