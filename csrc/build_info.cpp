// Build metadata of the extension, for `python -m resalign_fast.info`.
#if __has_include("resalign_build_info.h")
#include "resalign_build_info.h"
#else
#define RESALIGN_BUILD_VARIANT "unknown"
#define RESALIGN_BUILD_SYSTEM "unknown"
#define RESALIGN_CXX_FLAGS ""
#define RESALIGN_NVCC_FLAGS ""
#define RESALIGN_CUDA_ARCH_LIST ""
#define RESALIGN_TORCH_VERSION ""
#define RESALIGN_TORCH_CUDA_VERSION ""
#endif

#include "cpu_loop.h"
#include "ops.h"

namespace resalign {

std::unordered_map<std::string, std::string> build_info() {
  std::unordered_map<std::string, std::string> info{
      {"variant", RESALIGN_BUILD_VARIANT},
      {"build_system", RESALIGN_BUILD_SYSTEM},
      {"cxx_flags", RESALIGN_CXX_FLAGS},
      {"nvcc_flags", RESALIGN_NVCC_FLAGS},
      {"cuda_arch_list", RESALIGN_CUDA_ARCH_LIST},
      {"torch_version", RESALIGN_TORCH_VERSION},
      {"torch_cuda_version", RESALIGN_TORCH_CUDA_VERSION},
#ifdef RESALIGN_WITH_CUDA
      {"cuda_ops", "yes"},
#else
      {"cuda_ops", "no"},
#endif
#ifdef _OPENMP
      {"openmp", std::to_string(_OPENMP)},
#else
      {"openmp", "no"},
#endif
#ifdef __VERSION__
      {"compiler", __VERSION__},
#endif
      {"cpu_fma_path", cpu_has_fma() ? "avx2+fma" : "portable"},
  };
  return info;
}

}  // namespace resalign
