#!/usr/bin/env bash
# Builds the libFuzzer target of the safetensors reader with clang (address + undefined sanitizers)
# and runs it for a bounded time over the seed corpus in test/fuzz/corpus/safetensors (copied, so the
# repository is not touched). Needs clang and Debian's libclang-rt (scripts/test.sh installs them).
#
#   scripts/fuzz.sh [seconds]      (default 60; FUZZ_SECONDS works too)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-${FUZZ_SECONDS:-60}}
build=${DRDIFF_BUILD_DIR:-$root/build}/fuzz
cxx=${FUZZ_CXX:-$(command -v clang++ || true)}
[ -n "$cxx" ] || { echo "fuzz: clang++ not found (scripts/install_deps.sh clang libclang-rt-dev)" >&2; exit 1; }
mkdir -p "$build/corpus"
"$cxx" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$root/include" "$root/test/fuzz/safetensors_fuzz.cpp" -o "$build/safetensors_fuzz"
cp -n "$root"/test/fuzz/corpus/safetensors/* "$build/corpus/" 2>/dev/null || true
echo "fuzz: safetensors reader for ${seconds} s"
"$build/safetensors_fuzz" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
  "$build/corpus" 2>&1 | tail -n 12
