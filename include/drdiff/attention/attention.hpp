#pragma once
/// \file
/// The attention front end: `drdiff::attention(ctx, policy, args)` and its workspace query.
/// Portable; the backends specialise detail::attention_impl (cpu/attention.hpp, cuda/attention.cuh).

#include <drdiff/attention/args.hpp>
#include <drdiff/attention/concepts.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/core/traits.hpp>

#include <cstddef>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Primary template: exists only to fail with a readable message.
template <class Backend, class T, class = void>
struct attention_impl {
  static_assert(dependent_false<Backend, T>,
                "drdiff::attention: no implementation for this backend and element type. For drdiff::cpu "
                "(float, double) include <drdiff/drdiff.hpp>; for drdiff::cuda include <drdiff/cuda.cuh> in a .cu file.");
};

template <class Policy>
constexpr void check_policy() {
  static_assert(attn::is_policy_v<Policy>,
                "drdiff::attention: Policy does not satisfy the attention-policy contract (trivially copyable; "
                "block_q, block_k, mask, num_kv_blocks, kv_block, full_block — possibly after bind(n, head)). "
                "See docs/attention.md, 'Writing a new policy'.");
}

}  // namespace detail

/// Bytes of scratch memory `attention` needs for these arguments (query first, CUB style).
template <class Backend, class Policy, class T>
std::size_t attention_workspace_bytes(context<Backend> const& ctx, Policy const& policy,
                                      attention_args<T> const& args) {
  detail::check_policy<Policy>();
  return detail::attention_impl<Backend, T>::workspace_bytes(ctx, policy, args);
}

/// Runs attention with `policy` on the backend of `ctx`. `workspace` is caller-owned scratch of at
/// least attention_workspace_bytes(...) bytes; on drdiff::cpu a null workspace makes the call
/// allocate its own. Bad arguments throw drdiff::error before any work starts.
template <class Backend, class Policy, class T>
void attention(context<Backend> const& ctx, Policy const& policy, attention_args<T> const& args,
               void* workspace = nullptr, std::size_t workspace_bytes = 0) {
  static_assert(is_backend_v<Backend>, "drdiff::attention: Backend must be drdiff::cpu or drdiff::cuda.");
  detail::check_policy<Policy>();
  detail::attention_impl<Backend, T>::run(ctx, policy, args, workspace, workspace_bytes);
}

DRDIFF_NAMESPACE_END
