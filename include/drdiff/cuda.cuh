#pragma once
/// \file
/// Umbrella header for GPU users (include from .cu files): the core, every attention policy and the
/// CUDA backend. Does not include Eigen. The cuBLAS parts (MoE: <drdiff/cuda/moe.cuh>, anchors:
/// <drdiff/cuda/anchor.cuh>) are separate: include them and link CUDA::cublas.

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/anchor/guidance.hpp>
#include <drdiff/anchor/projectors.hpp>
#include <drdiff/attention/args.hpp>
#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/distributed.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/core/config.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/cuda/attention.cuh>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/device.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/solver.cuh>
#include <drdiff/router/routers.hpp>
#include <drdiff/solver/dpmpp.hpp>
#include <drdiff/solver/grid.hpp>
#include <drdiff/solver/noise.hpp>
#include <drdiff/solver/noise_schedule.hpp>
#include <drdiff/version.hpp>
