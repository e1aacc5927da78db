#pragma once
/// \file
/// Small type utilities shared by all concepts.

#include <drdiff/core/config.hpp>

#include <type_traits>

DRDIFF_NAMESPACE_BEGIN
namespace detail {

/// Always false, but only once instantiated: lets a primary template fail with a readable message.
template <class...>
inline constexpr bool dependent_false = false;

template <class...>
using void_t = void;

}  // namespace detail
DRDIFF_NAMESPACE_END
