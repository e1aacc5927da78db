#pragma once
// Runs one function per rank, each on its own thread (the ranks of a thread communicator), and
// returns each rank's error message ("" when it returned normally).

#include <cstddef>
#include <exception>
#include <string>
#include <thread>
#include <vector>

namespace drdiff::test {

template <class F>
std::vector<std::string> run_ranks(int ranks, F&& f) {
  std::vector<std::string> errors(static_cast<std::size_t>(ranks));
  std::vector<std::thread> threads;
  for (int r = 0; r < ranks; ++r)
    threads.emplace_back([&, r] {
      try {
        f(r);
      } catch (std::exception const& e) {
        errors[static_cast<std::size_t>(r)] = e.what();
      }
    });
  for (auto& t : threads) t.join();
  return errors;
}

}  // namespace drdiff::test
