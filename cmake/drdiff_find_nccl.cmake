# Finds NCCL for <drdiff/cuda/nccl.cuh>: the header and libnccl from the CUDA toolkit, a system
# package, $NCCL_HOME, or the nvidia-nccl Python wheels (where PyTorch's CUDA builds put it). Sets
# DRDIFF_NCCL_FOUND, DRDIFF_NCCL_INCLUDE_DIR and DRDIFF_NCCL_LIBRARY. Used by the project and by the
# installed package's NCCL component.
set(drdiff_nccl_hints "")
if(DEFINED ENV{NCCL_HOME})
  list(APPEND drdiff_nccl_hints $ENV{NCCL_HOME})
endif()
if(CUDAToolkit_LIBRARY_ROOT)
  list(APPEND drdiff_nccl_hints ${CUDAToolkit_LIBRARY_ROOT})
endif()
find_program(drdiff_python3 NAMES python3 python)
if(drdiff_python3)
  execute_process(COMMAND ${drdiff_python3} -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
                  OUTPUT_VARIABLE drdiff_nccl_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE drdiff_rc)
  if(drdiff_rc EQUAL 0 AND drdiff_nccl_wheel)
    list(APPEND drdiff_nccl_hints ${drdiff_nccl_wheel})
  endif()
endif()
# The toolkit's own NCCL first (built for its CUDA version), then $NCCL_HOME, then the wheels.
find_path(DRDIFF_NCCL_INCLUDE_DIR nccl.h HINTS ${CUDAToolkit_INCLUDE_DIRS} ${drdiff_nccl_hints} PATH_SUFFIXES include)
find_library(DRDIFF_NCCL_LIBRARY NAMES nccl libnccl.so.2 HINTS ${CUDAToolkit_LIBRARY_DIR} ${drdiff_nccl_hints}
             PATH_SUFFIXES lib lib64)
set(DRDIFF_NCCL_FOUND FALSE)
if(DRDIFF_NCCL_INCLUDE_DIR AND DRDIFF_NCCL_LIBRARY)
  set(DRDIFF_NCCL_FOUND TRUE)
endif()
