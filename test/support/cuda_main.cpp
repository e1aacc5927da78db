// Catch2 main of the CUDA test programs: with no CUDA device the program says so and exits with 77,
// which CTest reports as "skipped" (SKIP_RETURN_CODE).
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>

#include <cuda_runtime_api.h>

#include <cstdio>

int main(int argc, char* argv[]) {
  Catch::Session session;
  if (int const rc = session.applyCommandLine(argc, argv)) return rc;
  auto const& cfg = session.configData();
  bool const listing = cfg.listTests || cfg.listTestNamesOnly || cfg.listTags || cfg.listReporters;
  int devices = 0;
  if (!listing && (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0)) {
    std::printf("SKIPPED: no CUDA device found; the GPU tests of %s run on the GPU machine (scripts/gpu_lane.sh)\n",
                argv[0]);
    return 77;
  }
  return session.run();
}
