#pragma once
/// \file
/// Every built-in attention policy. Portable: no CUDA, no Eigen.

#include <drdiff/attention/concepts.hpp>
#include <drdiff/attention/density.hpp>
#include <drdiff/attention/index_range.hpp>
#include <drdiff/attention/pattern.hpp>
#include <drdiff/attention/policy/dense.hpp>
#include <drdiff/attention/policy/dilated.hpp>
#include <drdiff/attention/policy/global_tokens.hpp>
#include <drdiff/attention/policy/hsa.hpp>
#include <drdiff/attention/policy/local_window.hpp>
#include <drdiff/attention/policy/union.hpp>
