#pragma once
/// \file
/// CUDA side of the solvers: the fused state update x ← a·x + b0·m0 + b1·m1 + b2·m2 + c·z in one
/// kernel (state in fp32 or fp64; data predictions in the same type), with the counter-based noise
/// drawn in the kernel, so CPU and GPU compute the same numbers.

#include <drdiff/core/backend.hpp>
#include <drdiff/cuda/error.cuh>
#include <drdiff/cuda/kernels/solver.cuh>
#include <drdiff/cuda/launch.cuh>
#include <drdiff/solver/dpmpp.hpp>
#include <drdiff/solver/model.hpp>
#include <drdiff/solver/noise.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <vector>

DRDIFF_NAMESPACE_BEGIN

namespace solver {

/// The CUDA counterpart of update(context<cpu>, ...): device pointers, launched on ctx.stream.
template <class T>
void update(context<cuda> const& ctx, step_coefficients const& k, T* x, T const* m0, T const* m1, T const* m2,
            std::size_t n, gaussian_noise const& noise = {}, int step = 0) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "drdiff::solver::update: the solver state is fp32 or fp64 (keep it fp32 when the model runs bf16).");
  if (n == 0) return;
  auto const stream = drdiff::detail::cuda_stream(ctx);
  int const threads = 256;
  unsigned const blocks = drdiff::detail::stride_grid(n, threads, 16);
  bool const u1 = k.b[1] != 0, u2 = k.b[2] != 0, z = k.c != 0;
  T const a = T(k.a), b0 = T(k.b[0]), b1 = T(k.b[1]), b2 = T(k.b[2]), c = T(k.c);
  auto launch = [&](auto use1, auto use2, auto use_noise) {
    detail::solver_update_kernel<T, decltype(use1)::value, decltype(use2)::value, decltype(use_noise)::value>
        <<<blocks, threads, 0, stream>>>(x, m0, m1, m2, n, a, b0, b1, b2, c, noise, step);
  };
  using yes = std::true_type;
  using no = std::false_type;
  if (z) {
    if (u1 && u2) launch(yes{}, yes{}, yes{});
    else if (u1) launch(yes{}, no{}, yes{});
    else if (u2) launch(no{}, yes{}, yes{});
    else launch(no{}, no{}, yes{});
  } else {
    if (u1 && u2) launch(yes{}, yes{}, no{});
    else if (u1) launch(yes{}, no{}, no{});
    else if (u2) launch(no{}, yes{}, no{});
    else launch(no{}, no{}, no{});
  }
  DRDIFF_CUDA_CHECK(cudaGetLastError());
}

/// Workspace of the GPU sampling loop, in values of T: the three newest data predictions and a flag.
template <class T>
constexpr std::size_t sample_workspace_size(std::size_t n) noexcept {
  return 3 * n + 2;
}

/// The CUDA counterpart of dpmpp_sample(context<cpu>, ...): x and workspace are device pointers
/// (workspace: sample_workspace_size<T>(n) values); `model(x, t, x0)` and the hooks launch their
/// work on ctx.stream. A NaN or infinity in a data prediction is detected on the device and reported
/// after the loop (one synchronisation per call) with the first step where it appeared.
template <class T, class S, class Model, class X0Hook = no_hook, class XtHook = no_hook>
void dpmpp_sample(context<cuda> const& ctx, schedule_ops<S> const& ops, dpmpp_config const& cfg,
                  std::vector<double> const& grid, Model&& model, T* x, std::size_t n, T* workspace,
                  X0Hook&& correct_x0 = {}, XtHook&& correct_xt = {}, gaussian_noise const& noise = {}) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>,
                "drdiff::solver::dpmpp_sample (cuda): the solver state is fp32 or fp64");
  DRDIFF_CHECK(!cfg.singlestep, "dpmpp_sample (cuda): the singlestep (2S) loop runs on the CPU only; use multistep");
  auto const plan = dpmpp_plan(ops, cfg, grid);
  DRDIFF_CHECK(x != nullptr && workspace != nullptr, "dpmpp_sample: x or workspace is a null pointer");
  auto const stream = drdiff::detail::cuda_stream(ctx);
  int* const flag = reinterpret_cast<int*>(workspace + 3 * n);
  int const none = 0x7fffffff;
  DRDIFF_CUDA_CHECK(cudaMemcpyAsync(flag, &none, sizeof(int), cudaMemcpyHostToDevice, stream));
  unsigned const blocks = drdiff::detail::stride_grid(n, 256, 16);
  T* const m[3] = {workspace, workspace + n, workspace + 2 * n};
  multistep_loop(plan, grid, model, x, m, correct_x0, correct_xt,
                 [&](T const* x0, int s) {  // flagged on the device, reported after the loop
                   if (n == 0) return;
                   detail::solver_finite_kernel<T><<<blocks, 256, 0, stream>>>(x0, n, s, flag);
                   DRDIFF_CUDA_CHECK(cudaGetLastError());
                 },
                 [&](step_coefficients const& k, T* xs, T const* m0, T const* m1, T const* m2, int s) {
                   update(ctx, k, xs, m0, m1, m2, n, noise, s);
                 });
  int first_bad = none;
  DRDIFF_CUDA_CHECK(cudaMemcpyAsync(&first_bad, flag, sizeof(int), cudaMemcpyDeviceToHost, stream));
  DRDIFF_CUDA_CHECK(cudaStreamSynchronize(stream));
  DRDIFF_CHECK(first_bad == none, "dpmpp_sample (cuda): the data prediction is not finite (first at step ", first_bad,
               ")");
}

}  // namespace solver
DRDIFF_NAMESPACE_END
