#pragma once
/// \file
/// attention_args: the tensors and shape of one attention call, and their validation.

#include <drdiff/core/config.hpp>
#include <drdiff/core/error.hpp>

#include <utility>
#include <cmath>
#include <cstdint>
#include <type_traits>

DRDIFF_NAMESPACE_BEGIN

/// Element strides of a [batch, seq, heads, head_dim] tensor; head_dim is contiguous (stride 1).
/// 64-bit, so offsets past 2³¹ elements are safe.
struct tensor_strides {
  std::int64_t batch = 0, seq = 0, head = 0;
};

/// Strides of a packed [batch, seq, heads, head_dim] tensor.
constexpr tensor_strides packed_strides(int seq, int heads, int head_dim) noexcept {
  return {std::int64_t(seq) * heads * head_dim, std::int64_t(heads) * head_dim, std::int64_t(head_dim)};
}

/// One attention call: O = softmax(Q·Kᵀ·scale + mask)·V per (batch, head), bidirectional.
/// Q, K, V and O are [batch, seq, heads, head_dim] with explicit strides. Optional:
/// `maybe_lse` receives the natural-log log-sum-exp of each row's scaled scores, packed
/// [batch, heads, seq] (−inf for a row with no allowed key, whose output is 0);
/// `maybe_kv_lens` holds each batch's number of valid keys (1..seq): keys at or past it are masked
/// (padding). Memory is host memory for drdiff::cpu and device memory for drdiff::cuda.
template <class T>
struct attention_args {
  int batch = 0, seq = 0, heads = 0, head_dim = 0;
  T const* q = nullptr;
  T const* k = nullptr;
  T const* v = nullptr;
  T* o = nullptr;
  tensor_strides q_strides{}, k_strides{}, v_strides{}, o_strides{};
  /// fp32 for 16-bit element types (a bf16 lse would keep 3 digits), T otherwise.
  using lse_type = std::conditional_t<(sizeof(T) < 4), float, T>;
  lse_type* maybe_lse = nullptr;
  int const* maybe_kv_lens = nullptr;
  double softmax_scale = 0.0;  ///< 0: 1/√head_dim

  /// The scale actually applied.
  double scale() const noexcept { return softmax_scale != 0.0 ? softmax_scale : 1.0 / std::sqrt(double(head_dim)); }
  /// Valid keys of batch b.
  int kv_len(int b) const noexcept { return maybe_kv_lens ? maybe_kv_lens[b] : seq; }
};

/// Arguments for packed tensors of shape [batch, seq, heads, head_dim].
template <class T>
attention_args<T> make_attention_args(T const* q, T const* k, T const* v, T* o, int batch, int seq, int heads,
                                      int head_dim) {
  attention_args<T> a{};
  a.batch = batch; a.seq = seq; a.heads = heads; a.head_dim = head_dim;
  a.q = q; a.k = k; a.v = v; a.o = o;
  a.q_strides = a.k_strides = a.v_strides = a.o_strides = packed_strides(seq, heads, head_dim);
  return a;
}

/// Head dimensions the kernels accept: multiples of 8 in [32, 256].
constexpr bool supported_head_dim(int d) noexcept { return d >= 32 && d <= 256 && d % 8 == 0; }

namespace detail {
/// Strides of one tensor must not make two elements alias (outputs), or may broadcast a dimension
/// with stride 0 (inputs).
inline void check_strides(tensor_strides const& s, int batch, int seq, int heads, int head_dim, char const* name,
                          bool output) {
  DRDIFF_CHECK(s.batch >= 0 && s.seq >= 0 && s.head >= 0, "attention: ", name, " strides {batch = ", s.batch,
               ", seq = ", s.seq, ", head = ", s.head, "} must be non-negative");
  struct dim { std::int64_t stride, extent; char const* what; };
  dim d[4] = {{1, head_dim, "head_dim"}, {s.head, heads, "head"}, {s.seq, seq, "seq"}, {s.batch, batch, "batch"}};
  // The last element's offset must be representable (also in bytes, hence the margin of 16).
  std::int64_t last = 0;
  for (auto const& x : d) {
    if (x.extent <= 1 || x.stride == 0) continue;
    DRDIFF_CHECK(x.extent - 1 <= (INT64_MAX / 16 - last) / x.stride, "attention: ", name, " stride of ", x.what,
                 " = ", x.stride, " puts elements past 2^59");
    last += (x.extent - 1) * x.stride;
  }
  int n = 0;
  dim live[4];
  for (auto const& x : d) {
    if (x.extent <= 1) continue;
    if (x.stride == 0) {
      DRDIFF_CHECK(!output, "attention: ", name, " stride of ", x.what, " is 0 but its extent is ", x.extent,
                   " (an output cannot broadcast)");
      continue;
    }
    live[n++] = x;
  }
  for (int i = 1; i < n; ++i)  // insertion sort by stride (at most 4 entries)
    for (int j = i; j > 0 && live[j].stride < live[j - 1].stride; --j) std::swap(live[j], live[j - 1]);
  for (int i = 1; i < n; ++i)
    DRDIFF_CHECK(live[i - 1].stride <= INT64_MAX / live[i - 1].extent &&
                     live[i].stride >= live[i - 1].stride * live[i - 1].extent, "attention: ", name,
                 " strides are inconsistent: the ", live[i].what, " stride ", live[i].stride,
                 " is smaller than the ", live[i - 1].what, " extent × stride = ", live[i - 1].extent, " × ",
                 live[i - 1].stride, ", so elements overlap");
}
}  // namespace detail

namespace detail {
/// Bytes [first, last) a [batch, seq, heads, head_dim] tensor can touch.
template <class T>
std::pair<std::uintptr_t, std::uintptr_t> byte_span(void const* base, tensor_strides const& s, int batch, int seq,
                                                    int heads, int head_dim) {
  std::uint64_t const last = std::uint64_t(batch - 1) * s.batch + std::uint64_t(seq - 1) * s.seq +
                             std::uint64_t(heads - 1) * s.head + std::uint64_t(head_dim);
  auto const b = reinterpret_cast<std::uintptr_t>(base);
  return {b, b + last * sizeof(T)};
}
inline bool overlaps(std::pair<std::uintptr_t, std::uintptr_t> x, std::pair<std::uintptr_t, std::uintptr_t> y) {
  return x.first < y.second && y.first < x.second;
}
}  // namespace detail

/// Throws drdiff::error, naming the parameter and its value, when the arguments are not usable.
/// `host_lens`: whether maybe_kv_lens may be read on the host (true for drdiff::cpu).
template <class T>
void validate(attention_args<T> const& a, bool host_lens = true) {
  DRDIFF_CHECK(a.batch > 0, "attention: batch = ", a.batch, " must be > 0");
  DRDIFF_CHECK(a.seq > 0, "attention: seq = ", a.seq, " must be > 0");
  DRDIFF_CHECK(a.heads > 0, "attention: heads = ", a.heads, " must be > 0");
  DRDIFF_CHECK(supported_head_dim(a.head_dim), "attention: head_dim = ", a.head_dim,
               " is not supported (multiples of 8 in 32..256)");
  DRDIFF_CHECK(a.q != nullptr, "attention: q is a null pointer");
  DRDIFF_CHECK(a.k != nullptr, "attention: k is a null pointer");
  DRDIFF_CHECK(a.v != nullptr, "attention: v is a null pointer");
  DRDIFF_CHECK(a.o != nullptr, "attention: o is a null pointer");
  DRDIFF_CHECK(std::isfinite(a.softmax_scale), "attention: softmax_scale = ", a.softmax_scale, " is not finite");
  detail::check_strides(a.q_strides, a.batch, a.seq, a.heads, a.head_dim, "q", false);
  detail::check_strides(a.k_strides, a.batch, a.seq, a.heads, a.head_dim, "k", false);
  detail::check_strides(a.v_strides, a.batch, a.seq, a.heads, a.head_dim, "v", false);
  detail::check_strides(a.o_strides, a.batch, a.seq, a.heads, a.head_dim, "o", true);
  // Outputs are written while inputs are still read: they must not share memory.
  using span = std::pair<std::uintptr_t, std::uintptr_t>;
  span const o = detail::byte_span<T>(a.o, a.o_strides, a.batch, a.seq, a.heads, a.head_dim);
  span const in[3] = {detail::byte_span<T>(a.q, a.q_strides, a.batch, a.seq, a.heads, a.head_dim),
                      detail::byte_span<T>(a.k, a.k_strides, a.batch, a.seq, a.heads, a.head_dim),
                      detail::byte_span<T>(a.v, a.v_strides, a.batch, a.seq, a.heads, a.head_dim)};
  char const* const in_names[3] = {"q", "k", "v"};
  DRDIFF_CHECK(o.second >= o.first, "attention: o spans more bytes than the address space holds for batch = ",
               a.batch, ", seq = ", a.seq, ", heads = ", a.heads, ", head_dim = ", a.head_dim);
  for (int x = 0; x < 3; ++x) {
    DRDIFF_CHECK(in[x].second >= in[x].first, "attention: ", in_names[x], " spans more bytes than the address space "
                 "holds for batch = ", a.batch, ", seq = ", a.seq, ", heads = ", a.heads, ", head_dim = ", a.head_dim);
    // Two separate buffers overlap here only when the sizes reach past their ends (the library cannot
    // see a buffer's size), or when o aliases the input: the message says both.
    DRDIFF_CHECK(!detail::overlaps(o, in[x]), "attention: the ", o.second - o.first, " bytes o spans for batch = ",
                 a.batch, ", seq = ", a.seq, ", heads = ", a.heads, ", head_dim = ", a.head_dim, " overlap the ",
                 in[x].second - in[x].first, " bytes of ", in_names[x],
                 ": either o aliases ", in_names[x], " (in-place attention is not supported) or the sizes are "
                 "larger than the buffers");
  }
  if (a.maybe_lse) {
    auto const l0 = reinterpret_cast<std::uintptr_t>(a.maybe_lse);
    span const l{l0, l0 + std::uint64_t(a.batch) * a.heads * a.seq * sizeof(*a.maybe_lse)};
    DRDIFF_CHECK(l.second >= l.first, "attention: maybe_lse spans more bytes than the address space holds");
    DRDIFF_CHECK(!detail::overlaps(o, l), "attention: maybe_lse overlaps o");
    for (int x = 0; x < 3; ++x)
      DRDIFF_CHECK(!detail::overlaps(l, in[x]), "attention: maybe_lse overlaps ", in_names[x]);
  }
  if (a.maybe_kv_lens && host_lens)
    for (int b = 0; b < a.batch; ++b)
      DRDIFF_CHECK(a.maybe_kv_lens[b] >= 1 && a.maybe_kv_lens[b] <= a.seq, "attention: kv_lens[", b, "] = ",
                   a.maybe_kv_lens[b], " is outside 1..seq = ", a.seq);
}

DRDIFF_NAMESPACE_END
