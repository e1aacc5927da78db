#pragma once
/// \file
/// drdiff::nccl_communicator: the communicator of drdiff::distributed_attention over NCCL, one per
/// GPU (rank). Optional: include it only where NCCL is present (CMake: the component `nccl`, target
/// drdiff::nccl). The communicator borrows an ncclComm_t that the caller made (ncclCommInitRank or
/// ncclCommInitAll) and still owns; every call is enqueued on the context's stream.
///
///   ncclComm_t comm;  ncclCommInitRank(&comm, size, id, rank);
///   drdiff::nccl_communicator nc(comm);
///   drdiff::distributed_context<drdiff::cuda, drdiff::nccl_communicator> d{{stream}, &nc};

#include <drdiff/cuda/distributed.cuh>
#include <drdiff/cuda/error.cuh>

#include <nccl.h>

#include <cstddef>
#include <sstream>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN

/// A failed NCCL call.
class nccl_error : public error {
 public:
  nccl_error(std::string const& what, ncclResult_t code) : error(what), code_(code) {}
  ncclResult_t code() const noexcept { return code_; }

 private:
  ncclResult_t code_;
};

namespace detail {
[[noreturn]] inline void throw_nccl(ncclResult_t code, char const* call) {
  std::ostringstream os;
  os << "drdiff: NCCL call " << call << " failed with " << int(code) << ": " << ncclGetErrorString(code);
  throw nccl_error(os.str(), code);
}
}  // namespace detail

#define DRDIFF_NCCL_CHECK(expr)                                                       \
  do {                                                                                \
    ncclResult_t const drdiff_nccl_ = (expr);                                         \
    if (drdiff_nccl_ != ncclSuccess) ::drdiff::detail::throw_nccl(drdiff_nccl_, #expr); \
  } while (0)

/// One rank of an NCCL communicator (borrowed).
class nccl_communicator {
 public:
  explicit nccl_communicator(ncclComm_t comm) : comm_(comm) {
    DRDIFF_CHECK(comm != nullptr, "nccl_communicator: comm is a null ncclComm_t");
    DRDIFF_NCCL_CHECK(ncclCommUserRank(comm, &rank_));
    DRDIFF_NCCL_CHECK(ncclCommCount(comm, &size_));
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return size_; }
  ncclComm_t get() const noexcept { return comm_; }

  void all_gather(context<drdiff::cuda> const& ctx, void const* send, void* recv, std::size_t bytes) {
    DRDIFF_NCCL_CHECK(ncclAllGather(send, recv, bytes, ncclUint8, comm_, ctx.stream));
  }
  /// In place.
  template <class A>
  void all_reduce(context<drdiff::cuda> const& ctx, A* data, std::size_t count, reduction op) {
    static_assert(std::is_same_v<A, float> || std::is_same_v<A, double>,
                  "drdiff::nccl_communicator::all_reduce: float or double");
    ncclDataType_t const type = std::is_same_v<A, float> ? ncclFloat32 : ncclFloat64;
    DRDIFF_NCCL_CHECK(ncclAllReduce(data, data, count, type, op == reduction::sum ? ncclSum : ncclMax, comm_,
                                    ctx.stream));
  }
  /// The sends and receives of one step, as one NCCL group (so that no pair waits on another).
  void exchange(context<drdiff::cuda> const& ctx, transfer const* sends, int num_sends, transfer const* recvs,
                int num_recvs) {
    DRDIFF_NCCL_CHECK(ncclGroupStart());
    ncclResult_t status = ncclSuccess;
    for (int x = 0; x < num_sends && status == ncclSuccess; ++x)
      status = ncclSend(sends[x].data, sends[x].bytes, ncclUint8, sends[x].peer, comm_, ctx.stream);
    for (int x = 0; x < num_recvs && status == ncclSuccess; ++x)
      status = ncclRecv(recvs[x].data, recvs[x].bytes, ncclUint8, recvs[x].peer, comm_, ctx.stream);
    ncclResult_t const end = ncclGroupEnd();
    if (status != ncclSuccess) detail::throw_nccl(status, "ncclSend/ncclRecv");
    DRDIFF_NCCL_CHECK(end);
  }

 private:
  ncclComm_t comm_;
  int rank_ = 0, size_ = 1;
};

DRDIFF_NAMESPACE_END
