# Helpers for DrDiff's own tests, benchmarks and examples (not installed).

# Warnings and optimisation for our own targets; consumers choose their own.
function(drdiff_internal_options target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wno-maybe-uninitialized>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${DRDIFF_NATIVE}>>:-march=native>
    $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${DRDIFF_NATIVE}>>:-Xcompiler=-march=native>)
endfunction()

# Our tests and examples read model directories (config.json): nlohmann-json is required for them.
if(NOT nlohmann_json_FOUND)
  message(FATAL_ERROR "DrDiff's tests and examples need nlohmann-json (Debian nlohmann-json3-dev; "
                      "scripts/install_deps.sh installs it), or configure with -DDRDIFF_BUILD_TESTS=OFF "
                      "-DDRDIFF_BUILD_EXAMPLES=OFF -DDRDIFF_BUILD_BENCHMARKS=OFF")
endif()

# The example programs parse their arguments with CLI11 (Debian libcli11-dev, header-only).
if(DRDIFF_BUILD_EXAMPLES)
  find_package(CLI11 2.1 CONFIG)
  if(NOT CLI11_FOUND)
    message(FATAL_ERROR "DrDiff's examples need CLI11 (Debian libcli11-dev; scripts/install_deps.sh installs "
                        "it), or configure with -DDRDIFF_BUILD_EXAMPLES=OFF")
  endif()
endif()
