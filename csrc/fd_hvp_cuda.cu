// Finite-difference HVP arithmetic on CUDA: x +- eps v (one pass) and (g+ - g-) / (2 eps).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "checks.h"
#include "cuda_launch.cuh"
#include "ops.h"

namespace resalign {
namespace {

template <typename T>
__global__ void fd_perturb_kernel(const T* __restrict__ x, const T* __restrict__ v, T* __restrict__ plus,
                                  T* __restrict__ minus, int64_t n, at::opmath_type<T> eps) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const acc_t t = eps * static_cast<acc_t>(v[i]);
    const acc_t xi = static_cast<acc_t>(x[i]);
    plus[i] = static_cast<T>(xi + t);
    minus[i] = static_cast<T>(xi - t);
  }
}

template <typename T>
__global__ void fd_combine_kernel(const T* __restrict__ gp, const T* __restrict__ gm, T* __restrict__ hv,
                                  int64_t n, at::opmath_type<T> two_eps) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    hv[i] = static_cast<T>((static_cast<acc_t>(gp[i]) - static_cast<acc_t>(gm[i])) / two_eps);
  }
}

}  // namespace

TensorPair fd_perturb_cuda(const Tensor& x, const Tensor& v, double eps, std::optional<Tensor> out_plus,
                          std::optional<Tensor> out_minus) {
  check_buffers("fd_perturb_cuda", {{"x", &x}, {"v", &v}});
  TORCH_CHECK(x.is_cuda(), "fd_perturb_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor plus = output_like(out_plus, x, "fd_perturb_cuda");
  Tensor minus = output_like(out_minus, x, "fd_perturb_cuda");
  const int64_t n = x.numel();
  if (n == 0) return {plus, minus};
  const int blocks = grid_blocks(n, x.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "fd_perturb_cuda", [&] {
    fd_perturb_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(), plus.mutable_data_ptr<scalar_t>(),
        minus.mutable_data_ptr<scalar_t>(), n, static_cast<at::opmath_type<scalar_t>>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {plus, minus};
}

Tensor fd_combine_cuda(const Tensor& g_plus, const Tensor& g_minus, double eps, std::optional<Tensor> out) {
  check_buffers("fd_combine_cuda", {{"g_plus", &g_plus}, {"g_minus", &g_minus}});
  TORCH_CHECK(g_plus.is_cuda(), "fd_combine_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(g_plus.device());
  Tensor hv = output_like(out, g_plus, "fd_combine_cuda");
  const int64_t n = g_plus.numel();
  if (n == 0) return hv;
  const int blocks = grid_blocks(n, g_plus.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g_plus.scalar_type(), "fd_combine_cuda", [&] {
    fd_combine_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g_plus.const_data_ptr<scalar_t>(), g_minus.const_data_ptr<scalar_t>(),
        hv.mutable_data_ptr<scalar_t>(), n, static_cast<at::opmath_type<scalar_t>>(2.0 * eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return hv;
}

}  // namespace resalign
