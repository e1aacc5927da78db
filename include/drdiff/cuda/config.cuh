#pragma once
/// \file
/// Device-side macros of the CUDA backend. Include only from .cu files (nvcc).

#include <drdiff/core/config.hpp>

#if !defined(__CUDACC__)
#error "drdiff/cuda/*.cuh headers need a CUDA compiler: include <drdiff/cuda.cuh> from a .cu file."
#endif

#define DRDIFF_DEVICE __device__ inline
#define DRDIFF_PRAGMA_UNROLL _Pragma("unroll")
