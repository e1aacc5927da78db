#pragma once
// Starting several threads at the same moment (the concurrency tests, CPU and GPU).

#include <atomic>
#include <thread>
#include <vector>

namespace drdiff::test {

/// Runs job(i) for i < 4 on 4 threads released together, then joins them.
template <class Job>
void four_at_once(Job&& job) {
  std::atomic<int> ready{0};
  std::vector<std::thread> pool;
  for (int i = 0; i < 4; ++i)
    pool.emplace_back([&, i] {
      ready.fetch_add(1);
      while (ready.load() < 4) std::this_thread::yield();
      job(i);
    });
  for (auto& t : pool) t.join();
}

}  // namespace drdiff::test
