#pragma once
/// \file
/// Anchor projectors: maps P from a data prediction x̂0 [batch, seq, dim] to an anchor state of the
/// same shape. Small trivially copyable descriptions (pointers into the caller's weights, in the
/// memory of the backend that runs them) shared by both backends; `anchor::project` in
/// cpu/anchor.hpp and cuda/anchor.cuh applies them.
///
/// - identity:           P(x) = x.
/// - nearest_embedding:  the rounding step. Each token goes to the table row with the best score:
///                       −‖x − E_v‖² (l2; computed as x·E_v − ½‖E_v‖², one GEMM) or x·E_v (dot,
///                       the tied lm_head's arg-max). Ties go to the smaller id.
/// - segment_pool:       the mean over segments of `length` tokens (the last segment of a sequence may
///                       be shorter), optionally through a rank-r projection up·(down·mean), broadcast
///                       back to every token of the segment.
/// - linear:             P(x) = W·x + b per token (a learned projector; W is dim × dim, row-major).

#include <drdiff/anchor/absorbing.hpp>
#include <drdiff/core/error.hpp>

#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace anchor {

struct identity {
  void validate(token_shape const& s) const { s.validate("identity"); }
};

enum class metric { l2, dot };

template <class T>
struct nearest_embedding {
  T const* table = nullptr;  ///< [vocab, dim], row-major
  int vocab = 0;
  int dim = 0;
  metric score = metric::l2;

  void validate(token_shape const& s) const {
    s.validate("nearest_embedding");
    DRDIFF_CHECK(vocab > 0, "nearest_embedding: vocab = ", vocab, " must be > 0");
    DRDIFF_CHECK(table != nullptr, "nearest_embedding: table is a null pointer");
    DRDIFF_CHECK(dim == s.dim, "nearest_embedding: the table has dim = ", dim, " but the tokens have dim = ", s.dim);
  }
};

template <class T>
struct segment_pool {
  int length = 0;               ///< tokens per segment (> 0)
  int rank = 0;                 ///< 0 = plain mean; else the projection's rank
  T const* maybe_down = nullptr;  ///< [rank, dim] (rank > 0)
  T const* maybe_up = nullptr;    ///< [dim, rank] (rank > 0)

  void validate(token_shape const& s) const {
    s.validate("segment_pool");
    DRDIFF_CHECK(length > 0, "segment_pool: length = ", length, " must be > 0");
    DRDIFF_CHECK(rank >= 0, "segment_pool: rank = ", rank, " must be >= 0");
    DRDIFF_CHECK(rank == 0 || (maybe_down != nullptr && maybe_up != nullptr), "segment_pool: rank = ", rank,
                 " needs both down [rank, dim] and up [dim, rank] weights");
    DRDIFF_CHECK(rank <= s.dim, "segment_pool: rank = ", rank, " exceeds dim = ", s.dim);
  }
  /// Segments per sequence.
  int segments(int seq) const noexcept { return (seq + length - 1) / length; }
};

template <class T>
struct linear {
  T const* weight = nullptr;      ///< [dim, dim], row-major: out_i = Σ_j W_ij x_j + b_i
  T const* maybe_bias = nullptr;  ///< [dim]
  int dim = 0;

  void validate(token_shape const& s) const {
    s.validate("linear");
    DRDIFF_CHECK(weight != nullptr, "linear: weight is a null pointer");
    DRDIFF_CHECK(dim == s.dim, "linear: the weight is ", dim, " x ", dim, " but the tokens have dim = ", s.dim);
  }
};

template <class P>
struct is_projector : std::false_type {};
template <>
struct is_projector<identity> : std::true_type {};
template <class T>
struct is_projector<nearest_embedding<T>> : std::true_type {};
template <class T>
struct is_projector<segment_pool<T>> : std::true_type {};
template <class T>
struct is_projector<linear<T>> : std::true_type {};
template <class P>
inline constexpr bool is_projector_v = is_projector<P>::value;

}  // namespace anchor
DRDIFF_NAMESPACE_END
