#pragma once
/// \file
/// Row-major linear layers on the CPU: Y (+)= X·Wᵀ (+ b) as Eigen GEMMs over 128-row chunks on the
/// workers. Shared by the model's layers and the linear anchor projector.

#include <drdiff/core/backend.hpp>
#include <drdiff/cpu/detail/parallel.hpp>

#include <Eigen/Core>

#include <algorithm>
#include <cstdint>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Y[rows × out] (+)= X[rows × in] · Wᵀ (+ b), W row-major [out × in]; X and Y must not overlap.
/// T is deduced from x alone (the bias may be a plain nullptr).
template <class T>
void linear_rows(context<cpu> const& ctx, T const* x, std::int64_t rows, int in,
                 typename std::common_type<T>::type const* w, int out,
                 typename std::common_type<T>::type const* maybe_bias, T* y, bool accumulate) {
  using matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  std::int64_t const chunk = 128;
  Eigen::Map<matrix const> W(w, out, in);
  parallel_for(resolve_threads(ctx.num_threads), (rows + chunk - 1) / chunk, [&](std::int64_t c, int) {
    std::int64_t const r0 = c * chunk, n = std::min(chunk, rows - r0);
    Eigen::Map<matrix const> X(x + r0 * in, n, in);
    Eigen::Map<matrix> Y(y + r0 * out, n, out);
    if (accumulate) Y.noalias() += X * W.transpose();
    else Y.noalias() = X * W.transpose();
    if (maybe_bias) Y.rowwise() += Eigen::Map<Eigen::Matrix<T, 1, Eigen::Dynamic> const>(maybe_bias, out);
  });
}

}  // namespace detail
DRDIFF_NAMESPACE_END
