#pragma once
/// \file
/// Umbrella header for CPU users: the core, attention policies and their capabilities, routers and the
/// MoE, solvers, anchors, the model (with its weights files and the byte tokenizer) and the CPU (Eigen)
/// backend; <drdiff/cuda.cuh> is its GPU mirror.
/// Needs only a C++17 compiler and Eigen 3.4; no CUDA toolkit.

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
#include <drdiff/cpu/anchor.hpp>
#include <drdiff/cpu/attention.hpp>
#include <drdiff/cpu/attention_backward.hpp>
#include <drdiff/cpu/attention_reference.hpp>
#include <drdiff/cpu/distributed.hpp>
#include <drdiff/cpu/model.hpp>
#include <drdiff/cpu/moe.hpp>
#include <drdiff/cpu/solver.hpp>
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
