#pragma once
/// \file
/// Umbrella header for GPU users (include from a .cu file): everything <drdiff/drdiff.hpp> has, with the
/// CUDA backend in place of the CPU one — the core, every attention policy and its capabilities, the
/// routers and the MoE, the solvers, the anchors, the model (its weights files and the byte
/// tokenizer), and the CUDA backend of each. Does not include Eigen. Link CUDA::cudart and
/// CUDA::cublas (the MoE, the anchors and the model run cuBLAS GEMMs).
///
/// CUB and Thrust (from the CUDA toolkit) declare a namespace `::cuda`; with `using namespace drdiff;`
/// a plain `cuda` is then ambiguous. Name the backend tag `drdiff::cuda` (e.g. `context<drdiff::cuda>`),
/// or declare `using drdiff::cuda;` inside your own function or namespace.

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/anchor/guidance.hpp>
#include <drdiff/anchor/projectors.hpp>
#include <drdiff/attention/args.hpp>
#include <drdiff/attention/attention.hpp>
#include <drdiff/attention/backward.hpp>
#include <drdiff/attention/block_segments.hpp>
#include <drdiff/attention/capabilities.hpp>
#include <drdiff/attention/distributed.hpp>
#include <drdiff/attention/distributed_attention.hpp>
#include <drdiff/attention/distributed_ops.hpp>
#include <drdiff/attention/policies.hpp>
#include <drdiff/core/backend.hpp>
#include <drdiff/core/config.hpp>
#include <drdiff/core/distributed.hpp>
#include <drdiff/core/error.hpp>
#include <drdiff/core/thread_comm.hpp>
#include <drdiff/cuda/anchor.cuh>
#include <drdiff/cuda/attention.cuh>
#include <drdiff/cuda/attention_backward.cuh>
#include <drdiff/cuda/config.cuh>
#include <drdiff/cuda/device.cuh>
#include <drdiff/cuda/distributed.cuh>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/model.cuh>
#include <drdiff/cuda/moe.cuh>
#include <drdiff/cuda/solver.cuh>
#include <drdiff/model/config.hpp>
#include <drdiff/model/model.hpp>
#include <drdiff/model/parameters.hpp>
#include <drdiff/model/safetensors.hpp>
#include <drdiff/model/tokenizer.hpp>
#include <drdiff/model/weights.hpp>
#include <drdiff/router/distributed_moe.hpp>
#include <drdiff/router/moe.hpp>
#include <drdiff/router/routers.hpp>
#include <drdiff/solver/dpmpp.hpp>
#include <drdiff/solver/grid.hpp>
#include <drdiff/solver/model.hpp>
#include <drdiff/solver/noise.hpp>
#include <drdiff/solver/noise_schedule.hpp>
#include <drdiff/solver/problems.hpp>
#include <drdiff/version.hpp>
