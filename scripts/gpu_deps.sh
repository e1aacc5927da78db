#!/usr/bin/env bash
# Fills the git-ignored .deps/ folder with what the GPU machine lacks (it has CUDA, cmake, Google
# Benchmark and PyTorch, but no Eigen, no Catch2 and no package registry): the headers and CMake
# package files of Debian's libeigen3-dev, catch2, nlohmann-json3-dev and libcli11-dev, and this machine's libbenchmark shared
# library for binaries built here. Run it here, then name .deps in the device tool's `carry`.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/install_deps.sh"
deps=$root/.deps
rm -rf "$deps"
mkdir -p "$deps/include" "$deps/share/eigen3/cmake" "$deps/lib/cmake/Catch2" "$deps/lib/runtime"
cp -r /usr/include/eigen3 "$deps/include/"
cp -r /usr/include/catch2 "$deps/include/"
cp /usr/share/eigen3/cmake/* "$deps/share/eigen3/cmake/"
cp /usr/lib/cmake/Catch2/* "$deps/lib/cmake/Catch2/"
# The Debian package files point at /usr/include: make them relative to the prefix.
sed -i 's|/usr/include/eigen3|${PACKAGE_PREFIX_DIR}/include/eigen3|g; s|"/usr/include/eigen3"|"${PACKAGE_PREFIX_DIR}/include/eigen3"|g' \
  "$deps/share/eigen3/cmake/"*.cmake
cp /usr/lib/libCatch2WithMain.a "$deps/lib/"  # named by the Catch2 package files
# nlohmann-json (header-only; its package files find the headers relative to their own folder).
mkdir -p "$deps/share/cmake"
cp -r /usr/include/nlohmann "$deps/include/"
cp -r /usr/share/cmake/nlohmann_json "$deps/share/cmake/"
# CLI11 (header-only; the examples' argument parsing), the same way.
cp -r /usr/include/CLI "$deps/include/"
cp -r /usr/share/cmake/CLI11 "$deps/share/cmake/"
cp -L /usr/lib/x86_64-linux-gnu/libbenchmark.so.1debian "$deps/lib/runtime/"
du -sh "$deps"
