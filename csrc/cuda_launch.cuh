// Launch helpers for the CUDA kernels: grid-stride launch shape, stream, argument checks.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace resalign {

constexpr int kThreads = 256;

// Blocks for a grid-stride loop over n elements: enough to fill every SM several times over,
// no more (each block then reads a long contiguous stretch; fewer partial sums to reduce).
inline int grid_blocks(int64_t n, int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t want = (n + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sms) * 8)));
}

}  // namespace resalign
