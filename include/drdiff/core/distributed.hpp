#pragma once
/// \file
/// What every sequence- or expert-parallel call shares (portable): the distributed context (a backend
/// context and a communicator), the communicator's vocabulary (reduction, transfer), the element-wise
/// steps a backend provides (detail::dist_exec), and the agreement that makes bad arguments on one
/// rank an error on every rank instead of a hang. Used by attention/distributed_attention.hpp and
/// router/distributed_moe.hpp.
///
/// A communicator (duck-typed) provides, for the backend B of the context:
///   int rank() const;  int size() const;
///   void all_gather(context<B> const&, void const* send, void* recv, std::size_t bytes_each);
///   void all_reduce(context<B> const&, float* or double* data, std::size_t count, reduction);
///   void exchange(context<B> const&, transfer const* sends, int num_sends, transfer const* recvs,
///                 int num_recvs);   // pairwise: every send meets the peer's receive of equal size
/// and optionally `void abort() noexcept` (called when this rank fails after the agreement).
/// drdiff::thread_communicator (core/thread_comm.hpp) and drdiff::nccl_communicator (cuda/nccl.cuh)
/// are the library's.

#include <drdiff/core/backend.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/core/traits.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

DRDIFF_NAMESPACE_BEGIN

/// What an all-reduce computes.
enum class reduction { sum, max };

/// One side of a pairwise transfer: `bytes` at `data` (backend memory) to or from rank `peer`.
struct transfer {
  int peer = 0;
  void* data = nullptr;
  std::size_t bytes = 0;
};

/// One rank of a parallel call: its backend context and the communicator over the ranks
/// (borrowed; one per rank).
template <class Backend, class Comm>
struct distributed_context {
  context<Backend> local{};
  Comm* comm = nullptr;
};

namespace detail {

/// Primary template: the backends specialise it (cpu/distributed.hpp, cuda/distributed.cuh) with
///   static void for_each(context<B> const&, F const& f);           // f(e) for e < f.size()
///   static void zero(context<B> const&, void* p, std::size_t bytes);
///   static void upload(context<B> const&, void* dst, void const* host, std::size_t bytes);
///   static void download(context<B> const&, void* host, void const* src, std::size_t bytes);  // complete on return
///   static constexpr bool host_memory;                               // the backend's memory is the host's
///   static void enter(context<B> const&);                            // make the context's device current
///   template <class Comm> static void agree(context<B> const&, Comm&, double* host, int count, void* scratch);
///                                                                   // all-reduce max of `host`, in place
template <class Backend, class = void>
struct dist_exec {
  static_assert(dependent_false<Backend>,
                "drdiff: no element-wise steps of the distributed calls for this backend. For drdiff::cpu include "
                "<drdiff/drdiff.hpp>; for drdiff::cuda include <drdiff/cuda.cuh> in a .cu file.");
};

template <class C, class = void>
struct has_abort : std::false_type {};
template <class C>
struct has_abort<C, void_t<decltype(std::declval<C&>().abort())>> : std::true_type {};

inline constexpr std::size_t dist_align = 256;
inline constexpr int dist_agree_count = 16;  // the failure flag and up to 7 values, each as x and −x

/// Takes `bytes` at `at`, rounded up to the alignment; returns where they start.
inline std::size_t dist_take(std::size_t& at, std::size_t bytes) {
  std::size_t const here = at;
  at += (bytes + dist_align - 1) / dist_align * dist_align;
  return here;
}

inline unsigned char* dist_aligned(void* p) {
  auto const a = reinterpret_cast<std::uintptr_t>(p);
  return reinterpret_cast<unsigned char*>((a + dist_align - 1) / dist_align * dist_align);
}

template <class Comm>
void dist_check_comm(char const* who, Comm const* comm) {
  DRDIFF_CHECK(comm != nullptr, who, ": the context's comm is a null pointer");
  DRDIFF_CHECK(comm->size() >= 1 && comm->rank() >= 0 && comm->rank() < comm->size(),
               who, ": the communicator's rank = ", comm->rank(), " and size = ", comm->size(),
               " are not a rank of a group");
}

/// The agreement needs a few bytes of the workspace before anything else can be checked. Without
/// them this rank cannot take part: it aborts the communicator when it can (the others then throw
/// too), else they wait for it, as NCCL's ranks do for a rank that never calls.
template <class Comm>
void dist_check_agree_space(char const* who, Comm& comm, void* workspace, std::size_t bytes) {
  std::size_t constexpr need = dist_agree_count * sizeof(double) + dist_align;
  if (workspace != nullptr && bytes >= need) return;
  if constexpr (has_abort<Comm>::value) comm.abort();
  DRDIFF_CHECK(false, who, ": rank ", comm.rank(), "'s workspace (", bytes, " bytes at ", workspace,
               ") cannot even hold the ranks' agreement on the arguments (", need, " bytes)");
}

/// A 32-bit FNV-1a hash of integers, exact in a double: a fingerprint the ranks compare.
struct dist_fingerprint {
  std::uint32_t h = 2166136261u;
  void add(std::int64_t v) {
    for (int b = 0; b < 8; ++b) {
      h ^= std::uint32_t((std::uint64_t(v) >> (8 * b)) & 0xffu);
      h *= 16777619u;
    }
  }
  double value() const { return double(h); }
};

/// Conversions between an element type and fp32 in the shared functors; the CUDA side specialises
/// it for __nv_bfloat16 and __half with the intrinsics (the conversion operators may be disabled, as
/// PyTorch extensions do).
template <class To, class From, class = void>
struct dist_convert {
  DRDIFF_HOST_DEVICE static To apply(From x) { return To(x); }
};
template <class To, class From>
DRDIFF_HOST_DEVICE To dist_cast(From x) {
  return dist_convert<To, From>::apply(x);
}

/// The ranks agree: every rank learns whether any rank's own checks failed (`failure`, empty when
/// they passed) and whether all ranks pass the same `count` (≤ 7) numbers `values` (named by
/// `names`); one all-reduce of the maximum of [failed, x, −x]. Throws drdiff::error on every rank
/// when any of it does not hold. `scratch`: dist_agree_count doubles of the backend's memory.
template <class Backend, class Comm>
void dist_agree(distributed_context<Backend, Comm> const& d, char const* who, std::string const& failure,
                double const* values, char const* const* names, int count, void* scratch) {
  constexpr int most = (dist_agree_count - 1) / 2;
  DRDIFF_CHECK(count <= most, who, ": ", count, " values to agree on (at most ", most, ")");
  double vals[dist_agree_count] = {failure.empty() ? 0.0 : 1.0};
  for (int x = 0; x < count; ++x) {
    vals[1 + x] = values[x];
    vals[1 + most + x] = -values[x];
  }
  dist_exec<Backend>::agree(d.local, *d.comm, vals, dist_agree_count, scratch);
  if (!failure.empty()) throw error(failure);
  DRDIFF_CHECK(vals[0] == 0.0, who, ": another rank's arguments were refused (its error says why); rank ",
               d.comm->rank(), " stops too");
  for (int x = 0; x < count; ++x)
    DRDIFF_CHECK(vals[1 + x] == -vals[1 + most + x], who, ": the ranks disagree on ", names[x], ": from ",
                 -vals[1 + most + x], " to ", vals[1 + x]);
}

}  // namespace detail
DRDIFF_NAMESPACE_END
