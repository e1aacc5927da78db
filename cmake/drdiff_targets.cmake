# Helpers for DrDiff's own tests, benchmarks and examples (not installed).

# Warnings and optimisation for our own targets; consumers choose their own.
function(drdiff_internal_options target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wno-maybe-uninitialized>
    $<$<AND:$<COMPILE_LANGUAGE:CXX>,$<BOOL:${DRDIFF_NATIVE}>>:-march=native>
    $<$<AND:$<COMPILE_LANGUAGE:CUDA>,$<BOOL:${DRDIFF_NATIVE}>>:-Xcompiler=-march=native>)
endfunction()
