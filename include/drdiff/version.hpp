#pragma once
/// \file
/// The library's version. CMake's project() reads it from here (CMakeLists.txt), so the headers work
/// from the source tree with only `-I include`.

#define DRDIFF_VERSION_MAJOR 0
#define DRDIFF_VERSION_MINOR 1
#define DRDIFF_VERSION_PATCH 0
#define DRDIFF_VERSION_STRING "0.1.0"
