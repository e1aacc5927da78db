#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (address + undefined sanitizers) and runs each for a
# bounded time over its seed corpus (copied, so the repository is not touched): the safetensors
# reader (test/fuzz/corpus/safetensors), a model directory's config.json (test/fuzz/corpus/config,
# half the time), the JSON vocabulary tokenizer (test/fuzz/corpus/vocab, a quarter) and
# drdiff-generate's command line (test/fuzz/corpus/cli, a quarter). Needs clang and Debian's libclang-rt (scripts/test.sh installs them).
#
#   scripts/fuzz.sh [seconds]      (default 60; FUZZ_SECONDS works too)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
seconds=${1:-${FUZZ_SECONDS:-60}}
build=${DRDIFF_BUILD_DIR:-$root/build}/fuzz
cxx=${FUZZ_CXX:-$(command -v clang++ || true)}
[ -n "$cxx" ] || { echo "fuzz: clang++ not found (scripts/install_deps.sh clang libclang-rt-dev)" >&2; exit 1; }
# name source corpus seconds
run() {
  local name=$1 src=$2 corpus=$3 secs=$4
  "$cxx" -std=c++17 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -I"$root/include" ${5:-} "$root/test/fuzz/$src" -o "$build/$name"
  mkdir -p "$build/corpus_$name"
  cp -n "$root"/test/fuzz/corpus/"$corpus"/* "$build/corpus_$name/" 2>/dev/null || true
  echo "fuzz: $name for ${secs} s"
  "$build/$name" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    "$build/corpus_$name" 2>&1 | tail -n 12
}
mkdir -p "$build"
run safetensors_fuzz safetensors_fuzz.cpp safetensors "$seconds"
run config_fuzz config_fuzz.cpp config $(( (seconds + 1) / 2 ))
run vocab_fuzz vocab_fuzz.cpp vocab $(( (seconds + 3) / 4 ))
run cli_fuzz cli_fuzz.cpp cli $(( (seconds + 3) / 4 )) "-I$root/examples"
