#pragma once
/// \file
/// The CPU side of sequence-parallel attention: the element-wise steps (detail::dist_exec<cpu>) and
/// the copies of drdiff::cpu_communicator, whose ranks are threads of one process (core/thread_comm.hpp).
///
///   drdiff::thread_comm_group group(4);
///   // thread r:
///   drdiff::cpu_communicator comm(group, r);
///   drdiff::distributed_context<drdiff::cpu, drdiff::cpu_communicator> d{{1}, &comm};
///   drdiff::distributed_attention(d, policy, args, ws.data(), ws.size());

#include <drdiff/attention/distributed_attention.hpp>
#include <drdiff/cpu/attention.hpp>
#include <drdiff/core/thread_comm.hpp>
#include <drdiff/cpu/detail/parallel.hpp>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>

DRDIFF_NAMESPACE_BEGIN

/// Ranks that are threads of one process, with their data in host memory.
using cpu_communicator = thread_communicator<cpu>;

namespace detail {

template <>
struct thread_comm_memory<cpu> {
  static void copy(context<cpu> const&, void* dst, void const* src, std::size_t bytes) { std::memcpy(dst, src, bytes); }
  static void to_host(context<cpu> const&, void* dst, void const* src, std::size_t bytes) {
    std::memcpy(dst, src, bytes);
  }
  static void from_host(context<cpu> const&, void* dst, void const* src, std::size_t bytes) {
    std::memcpy(dst, src, bytes);
  }
  static void sync(context<cpu> const&) {}
};

template <>
struct dist_exec<cpu> {
  static constexpr bool host_memory = true;
  static void enter(context<cpu> const&) {}

  template <class F>
  static void for_each(context<cpu> const& ctx, F const& f) {
    std::int64_t const n = f.size();
    std::int64_t constexpr block = 1 << 14;
    parallel_for(resolve_threads(ctx.num_threads), (n + block - 1) / block, [&](std::int64_t item, int) {
      std::int64_t const end = std::min(n, (item + 1) * block);
      for (std::int64_t e = item * block; e < end; ++e) f(e);
    });
  }
  static void zero(context<cpu> const&, void* p, std::size_t bytes) { std::memset(p, 0, bytes); }
  static void upload(context<cpu> const&, void* dst, void const* host, std::size_t bytes) {
    if (bytes) std::memcpy(dst, host, bytes);
  }
  static void download(context<cpu> const&, void* host, void const* src, std::size_t bytes) {
    if (bytes) std::memcpy(host, src, bytes);
  }
  template <class Comm>
  static void agree(context<cpu> const& ctx, Comm& comm, double* host, int count, void*) {
    comm.all_reduce(ctx, host, std::size_t(count), reduction::max);
  }
};

}  // namespace detail
DRDIFF_NAMESPACE_END
