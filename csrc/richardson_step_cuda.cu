// richardson_step on CUDA: v_new = v + alpha (b - v - gamma hv) and both squared norms in one pass.
// Norms: fp64 per-thread sums, a block reduction to per-block partials, then one block sums the
// partials in a fixed order, so the result does not depend on scheduling.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>

#include "checks.h"
#include "cuda_launch.cuh"
#include "fused_math.h"
#include "ops.h"

namespace resalign {
namespace {

__device__ __forceinline__ double block_sum(double x, double* shared) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = x;
  __syncthreads();
  x = threadIdx.x < blockDim.x / 32 ? shared[threadIdx.x] : 0.0;
  if (warp == 0) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  }
  __syncthreads();
  return x;  // valid in thread 0
}

template <typename T>
__global__ void richardson_kernel(const T* __restrict__ v, const T* __restrict__ b,
                                  const T* __restrict__ hv, T* __restrict__ out, int64_t n,
                                  at::opmath_type<T> alpha, at::opmath_type<T> gamma,
                                  double* __restrict__ parts) {
  using acc_t = at::opmath_type<T>;
  __shared__ double shared[kThreads / 32];
  double su = 0.0, sn = 0.0;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t vi = static_cast<acc_t>(v[i]);
    const T vn = static_cast<T>(richardson_elem<acc_t>(vi, b[i], hv[i], alpha, gamma));
    out[i] = vn;
    const double d = static_cast<double>(static_cast<acc_t>(vn) - vi);
    su += d * d;
    sn += static_cast<double>(vn) * static_cast<double>(vn);
  }
  su = block_sum(su, shared);
  sn = block_sum(sn, shared);
  if (threadIdx.x == 0) {
    parts[2 * blockIdx.x] = su;
    parts[2 * blockIdx.x + 1] = sn;
  }
}

template <typename T, typename Out>
__global__ void finish_norms_kernel(const double* __restrict__ parts, int nparts, Out* __restrict__ norms) {
  __shared__ double shared[kThreads / 32];
  double su = 0.0, sn = 0.0;
  for (int i = threadIdx.x; i < nparts; i += blockDim.x) {
    su += parts[2 * i];
    sn += parts[2 * i + 1];
  }
  su = block_sum(su, shared);
  sn = block_sum(sn, shared);
  if (threadIdx.x == 0) {
    norms[0] = static_cast<Out>(su);
    norms[1] = static_cast<Out>(sn);
  }
}

}  // namespace

TensorTriple richardson_step_cuda(const Tensor& v, const Tensor& b, const Tensor& hv, double alpha,
                                 double gamma, std::optional<Tensor> out_buf) {
  check_buffers("richardson_step_cuda", {{"v", &v}, {"b", &b}, {"hv", &hv}});
  TORCH_CHECK(v.is_cuda(), "richardson_step_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(v.device());
  const int64_t n = v.numel();
  const int blocks = grid_blocks(n, v.get_device());
  auto stream = c10::cuda::getCurrentCUDAStream();
  Tensor out = output_like(out_buf, v, "richardson_step_cuda");
  // Norms in the input dtype, fp32 for half types (as the reference).
  const bool half = v.scalar_type() == at::kHalf || v.scalar_type() == at::kBFloat16;
  Tensor norms = at::empty({2}, v.options().dtype(half ? at::kFloat : v.scalar_type()));
  Tensor parts = at::empty({2 * blocks}, v.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(), "richardson_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    richardson_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(
        v.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(), hv.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), n, static_cast<acc_t>(alpha), static_cast<acc_t>(gamma),
        parts.mutable_data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finish_norms_kernel<scalar_t, acc_t><<<1, kThreads, 0, stream>>>(
        parts.const_data_ptr<double>(), blocks, norms.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, norms.select(0, 0), norms.select(0, 1)};
}

}  // namespace resalign
