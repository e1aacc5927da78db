#pragma once
/// \file
/// A communicator whose ranks are threads of one process: drdiff::thread_comm_group holds the shared
/// state, and each thread makes a drdiff::thread_communicator<Backend> for its rank. A collective is a
/// barrier, copies and another barrier. On drdiff::cpu it lets a machine's cores split one long
/// sequence (and serves the tests); on drdiff::cuda (<drdiff/cuda/distributed.cuh>) it runs several
/// ranks on one GPU, or on several GPUs of one process through peer copies, without NCCL: a test and
/// debugging transport, not a fast one. Across processes or machines use NCCL (<drdiff/cuda/nccl.cuh>).
/// The backends provide the copies: detail::thread_comm_memory<Backend>.
///
///   drdiff::thread_comm_group group(4);
///   // thread r:
///   drdiff::cpu_communicator comm(group, r);
///   drdiff::distributed_context<drdiff::cpu, drdiff::cpu_communicator> d{{1}, &comm};
///   drdiff::distributed_attention(d, policy, args, ws.data(), ws.size());

#include <drdiff/core/backend.hpp>
#include <drdiff/core/distributed.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/core/traits.hpp>

#include <algorithm>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN
namespace detail {
/// The copies of a thread communicator on backend B: copy (backend memory, on the context's stream),
/// to_host and from_host (complete on return), sync (the context's work so far is done).
template <class Backend, class = void>
struct thread_comm_memory {
  static_assert(dependent_false<Backend>, "drdiff::thread_communicator: no copies for this backend: include "
                "<drdiff/cpu/distributed.hpp> (drdiff::cpu) or <drdiff/cuda/distributed.cuh> (drdiff::cuda)");
};
}  // namespace detail

template <class Backend>
class thread_communicator;

/// The shared state of `size` ranks that are threads of one process. Lives as long as its ranks use
/// it. When a rank fails inside a collective (or calls abort()), every rank waiting in the group
/// throws drdiff::error, and so does every later collective: make a new group.
class thread_comm_group {
 public:
  explicit thread_comm_group(int size) : size_(size) {
    DRDIFF_CHECK(size >= 1, "thread_comm_group: size = ", size, " must be >= 1");
    slots_.assign(std::size_t(size), slot{});
    posted_.assign(std::size_t(size) * std::size_t(size), transfer{});
  }
  thread_comm_group(thread_comm_group const&) = delete;
  thread_comm_group& operator=(thread_comm_group const&) = delete;

  int size() const noexcept { return size_; }

  /// Makes every waiting and later collective of the group throw.
  void abort() noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    aborted_ = true;
    cv_.notify_all();
  }

 private:
  template <class Backend>
  friend class thread_communicator;
  struct slot {
    void const* data = nullptr;
    std::size_t bytes = 0;
  };

  void barrier() {
    std::unique_lock<std::mutex> lock(mutex_);
    DRDIFF_CHECK(!aborted_, "thread_communicator: the group was aborted (a rank failed); make a new group");
    std::uint64_t const gen = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
      return;
    }
    cv_.wait(lock, [&] { return generation_ != gen || aborted_; });
    DRDIFF_CHECK(generation_ != gen, "thread_communicator: another rank failed inside this collective; it is abandoned");
  }

  int size_;
  std::mutex mutex_;
  std::condition_variable cv_;
  int arrived_ = 0;
  std::uint64_t generation_ = 0;
  bool aborted_ = false;
  std::vector<slot> slots_;
  std::vector<transfer> posted_;  // [from · size + to]: what `from` sends `to` in the current exchange
};

/// One rank of a thread_comm_group (one per thread), whose data lives in the memory of `Backend`.
/// Every rank must call the same collectives in the same order, as with NCCL.
template <class Backend>
class thread_communicator {
  using memory = detail::thread_comm_memory<Backend>;

 public:
  thread_communicator(thread_comm_group& group, int rank) : group_(&group), rank_(rank) {
    DRDIFF_CHECK(rank >= 0 && rank < group.size(), "thread_communicator: rank = ", rank, " is outside 0..",
                 group.size() - 1);
  }

  int rank() const noexcept { return rank_; }
  int size() const noexcept { return group_->size(); }
  void abort() noexcept { group_->abort(); }

  /// recv[r · bytes, (r + 1) · bytes) = rank r's `send`, for every rank r.
  void all_gather(context<Backend> const& ctx, void const* send, void* recv, std::size_t bytes) {
    memory::sync(ctx);  // `send` is ready
    publish(send, bytes);
    std::string bad;
    for (int r = 0; r < size(); ++r) {
      auto const& s = group_->slots_[std::size_t(r)];
      if (s.bytes != bytes) {  // never copy from a buffer of another size
        if (bad.empty()) bad = mismatch("all_gather", r, s.bytes, bytes);
        continue;
      }
      if (bytes) memory::copy(ctx, static_cast<unsigned char*>(recv) + std::size_t(r) * bytes, s.data, bytes);
    }
    memory::sync(ctx);
    group_->barrier();
    DRDIFF_CHECK(bad.empty(), bad);
  }

  /// data = the element-wise sum or maximum over the ranks (the same bits on every rank: the ranks'
  /// values are combined in rank order; a NaN wins a maximum).
  template <class A>
  void all_reduce(context<Backend> const& ctx, A* data, std::size_t count, reduction op) {
    static_assert(std::is_same_v<A, float> || std::is_same_v<A, double>,
                  "drdiff::thread_communicator::all_reduce: float or double");
    memory::sync(ctx);
    publish(data, count * sizeof(A));
    std::string bad;
    std::vector<A> out(count), in(count);
    for (int r = 0; r < size() && bad.empty(); ++r) {
      auto const& s = group_->slots_[std::size_t(r)];
      if (s.bytes != count * sizeof(A)) {
        bad = mismatch("all_reduce", r, s.bytes, count * sizeof(A));
        break;
      }
      memory::to_host(ctx, in.data(), s.data, count * sizeof(A));
      A const* x = in.data();
      for (std::size_t e = 0; e < count; ++e) {
        if (r == 0) out[e] = x[e];
        else if (op == reduction::sum) out[e] += x[e];
        else out[e] = out[e] != out[e] || x[e] != x[e] ? (out[e] != out[e] ? out[e] : x[e]) : std::max(out[e], x[e]);
      }
    }
    group_->barrier();  // every rank has read every input
    DRDIFF_CHECK(bad.empty(), bad);
    memory::from_host(ctx, data, out.data(), count * sizeof(A));
  }

  /// Pairwise transfers: each send to rank p meets p's receive from this rank, of the same size.
  void exchange(context<Backend> const& ctx, transfer const* sends, int num_sends, transfer const* recvs,
                int num_recvs) {
    memory::sync(ctx);  // the sends are ready
    std::size_t const P = std::size_t(size());
    for (int x = 0; x < num_sends; ++x) {
      // A bad send stops the whole group: the peers would otherwise wait for this rank in the barrier.
      bool const in_range = sends[x].peer >= 0 && sends[x].peer < size();
      if (!in_range) group_->abort();
      DRDIFF_CHECK(in_range, "thread_communicator::exchange: rank ", rank_, " sends to peer ", sends[x].peer,
                   ", outside 0..", size() - 1);
      transfer& slot = group_->posted_[std::size_t(rank_) * P + std::size_t(sends[x].peer)];
      if (slot.data != nullptr) group_->abort();
      DRDIFF_CHECK(slot.data == nullptr, "thread_communicator::exchange: rank ", rank_, " sends to peer ",
                   sends[x].peer, " twice in one exchange");
      slot = sends[x];
    }
    group_->barrier();
    std::string bad;
    for (int x = 0; x < num_recvs && bad.empty(); ++x) {
      int const p = recvs[x].peer;
      if (p < 0 || p >= size()) {
        bad = "thread_communicator::exchange: rank " + std::to_string(rank_) + " receives from peer " +
              std::to_string(p) + ", outside 0.." + std::to_string(size() - 1);
        break;
      }
      transfer const& t = group_->posted_[std::size_t(p) * P + std::size_t(rank_)];
      if (t.data == nullptr || t.bytes != recvs[x].bytes) {
        bad = "thread_communicator::exchange: rank " + std::to_string(rank_) + " expects " +
              std::to_string(recvs[x].bytes) + " bytes from rank " + std::to_string(p) + ", which sends " +
              (t.data ? std::to_string(t.bytes) + " bytes" : std::string("nothing"));
        break;
      }
      if (t.bytes) memory::copy(ctx, recvs[x].data, t.data, t.bytes);
    }
    memory::sync(ctx);
    if (!bad.empty()) {
      group_->abort();  // the sender may wait for a receive that never comes
      DRDIFF_CHECK(false, bad);
    }
    group_->barrier();  // every receive has read its data
    for (std::size_t p = 0; p < P; ++p) group_->posted_[std::size_t(rank_) * P + p] = transfer{};
  }

 private:
  void publish(void const* data, std::size_t bytes) {
    group_->slots_[std::size_t(rank_)] = {data, bytes};
    group_->barrier();
  }
  std::string mismatch(char const* what, int r, std::size_t has, std::size_t want) const {
    return std::string("thread_communicator::") + what + ": rank " + std::to_string(r) + " passes " +
           std::to_string(has) + " bytes where rank " + std::to_string(rank_) + " passes " + std::to_string(want);
  }

  thread_comm_group* group_;
  int rank_;
};

DRDIFF_NAMESPACE_END
