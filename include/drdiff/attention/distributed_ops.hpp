#pragma once
/// \file
/// The element-wise steps of sequence-parallel attention, as small trivially copyable functors that
/// both backends run (a loop on drdiff::cpu, thrust::for_each_n on drdiff::cuda): moving rows between
/// the caller's tensors, packed buffers and a rank's frame, and the log-sum-exp merge of the global
/// rows' parts. Each is called once per element index e in [0, size()).

#include <drdiff/attention/args.hpp>
#include <drdiff/core/config.hpp>
#include <drdiff/core/distributed.hpp>

#include <cmath>
#include <cstdint>

DRDIFF_NAMESPACE_BEGIN
namespace attn {

/// dst[b, dst_row(x), h, :] = src[b, src_row(x), h, :] for x < count, every batch and head. A row map
/// is a list of rows (memory of the backend) or, when null, x + offset.
template <class T>
struct move_rows {
  T* dst = nullptr;
  tensor_strides ds{};
  int const* dst_rows = nullptr;
  int dst_offset = 0;
  T const* src = nullptr;
  tensor_strides ss{};
  int const* src_rows = nullptr;
  int src_offset = 0;
  int batch = 0, count = 0, heads = 0, dim = 0;

  DRDIFF_HOST_DEVICE constexpr std::int64_t size() const noexcept {
    return std::int64_t(batch) * count * heads * dim;
  }
  DRDIFF_HOST_DEVICE void operator()(std::int64_t e) const noexcept {
    int const d = int(e % dim);
    std::int64_t r = e / dim;
    int const h = int(r % heads);
    r /= heads;
    int const x = int(r % count);
    int const b = int(r / count);
    int const di = dst_rows ? dst_rows[x] : x + dst_offset;
    int const si = src_rows ? src_rows[x] : x + src_offset;
    dst[b * ds.batch + di * ds.seq + h * ds.head + d] = src[b * ss.batch + si * ss.seq + h * ss.head + d];
  }
};

/// Packed [batch, rows, heads, dim] strides.
DRDIFF_HOST_DEVICE constexpr tensor_strides packed(int rows, int heads, int dim) noexcept {
  return {std::int64_t(rows) * heads * dim, std::int64_t(heads) * dim, std::int64_t(dim)};
}

/// The first step of the merge: for each (b, h, global g), the weight of this rank's part against the
/// maximum of the parts' lse (already reduced into `m`): w = exp(lse − m), and acc = [w·o, w]
/// (dim + 1 values per row) for a sum over the ranks. A part with no key (lse = −∞) weighs 0; a NaN
/// stays NaN. `o`, `lse` are the part's [batch, rows, heads, dim] and [batch, heads, rows] with the
/// global rows at rows [row0, row0 + globals).
template <class T, class A>
struct merge_weigh {
  A* acc = nullptr;            ///< [batch, heads, globals, dim + 1]
  A const* m = nullptr;        ///< [batch, heads, globals]
  T const* o = nullptr;
  tensor_strides os{};
  A const* lse = nullptr;
  int lse_rows = 0, row0 = 0;
  int batch = 0, heads = 0, globals = 0, dim = 0;

  DRDIFF_HOST_DEVICE constexpr std::int64_t size() const noexcept {
    return std::int64_t(batch) * heads * globals * (dim + 1);
  }
  DRDIFF_HOST_DEVICE void operator()(std::int64_t e) const noexcept {
    int const d = int(e % (dim + 1));
    std::int64_t const row = e / (dim + 1);  // (b, h, g)
    int const g = int(row % globals);
    int const h = int(row / globals % heads);
    int const b = int(row / globals / heads);
    A const l = lse[(std::int64_t(b) * heads + h) * lse_rows + row0 + g];
    A const mx = m[row];
    // exp(−∞ − finite) = 0; both −∞ (no rank has a key): weight 0 too; NaN: NaN.
    A const w = l == -A(INFINITY) ? A(0) : A(std::exp(l - mx));
    acc[e] = d == dim ? w
                      : w * drdiff::detail::dist_cast<A>(o[b * os.batch + std::int64_t(row0 + g) * os.seq + h * os.head + d]);
  }
};

/// The last step: for the global rows this rank owns (globals [first, first + count), at the
/// caller's rows `rows[x]`), o = Σ w·o / Σ w and lse = m + log Σ w from the summed `acc`.
template <class T, class A>
struct merge_finish {
  T* o = nullptr;
  tensor_strides os{};
  A* lse = nullptr;  ///< [batch, heads, lse_rows] or null
  int lse_rows = 0;
  A const* acc = nullptr;
  A const* m = nullptr;
  int const* rows = nullptr;
  int first = 0, count = 0;
  int batch = 0, heads = 0, globals = 0, dim = 0;

  DRDIFF_HOST_DEVICE constexpr std::int64_t size() const noexcept {
    return std::int64_t(batch) * heads * count * (dim + 1);
  }
  DRDIFF_HOST_DEVICE void operator()(std::int64_t e) const noexcept {
    int const d = int(e % (dim + 1));
    std::int64_t const r = e / (dim + 1);
    int const x = int(r % count);
    int const h = int(r / count % heads);
    int const b = int(r / count / heads);
    std::int64_t const row = (std::int64_t(b) * heads + h) * globals + first + x;
    A const* a = acc + row * (dim + 1);
    A const w = a[dim];
    bool const nan = w != w;
    if (d < dim) {
      // w = 0 only when no rank had a key (impossible for a global row over n >= 1 keys): 0, as the
      // single-device kernels write for a row without keys.
      A const v = nan ? w : w > A(0) ? a[d] / w : A(0);
      o[b * os.batch + std::int64_t(rows[x]) * os.seq + h * os.head + d] = drdiff::detail::dist_cast<T>(v);
    } else if (lse) {
      lse[(std::int64_t(b) * heads + h) * lse_rows + rows[x]] = nan ? w : w > A(0) ? A(m[row] + std::log(w))
                                                                                    : -A(INFINITY);
    }
  }
};

}  // namespace attn
DRDIFF_NAMESPACE_END
