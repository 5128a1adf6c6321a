// Fused SGD and Adam/AdamW steps on CUDA, in place, with the arithmetic of fused_math.h
// (multiply-adds fused, as torch's CUDA kernels compile them). Half types compute in fp32.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include "checks.h"
#include "cuda_launch.cuh"
#include "fused_math.h"
#include "ops.h"

namespace resalign {
namespace {

template <typename T>
__global__ void sgd_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf, int64_t n,
                           SgdScalars<at::opmath_type<T>> s) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    acc_t pi = static_cast<acc_t>(p[i]);
    acc_t bi = buf != nullptr ? static_cast<acc_t>(buf[i]) : acc_t(0);
    sgd_elem<true>(pi, static_cast<acc_t>(g[i]), bi, s);
    p[i] = static_cast<T>(pi);
    if (buf != nullptr) buf[i] = static_cast<T>(bi);
  }
}

template <typename T>
__global__ void adam_kernel(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                            T* __restrict__ v, int64_t n, AdamScalars<at::opmath_type<T>> s) {
  using acc_t = at::opmath_type<T>;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    acc_t pi = static_cast<acc_t>(p[i]), mi = static_cast<acc_t>(m[i]), vi = static_cast<acc_t>(v[i]);
    const acc_t gi = static_cast<acc_t>(g[i]);
    // Uniform branches (same for every thread): one kernel instead of six instantiations.
    const WeightDecay wd = weight_decay_mode(s);
    if (small_lerp_weight(s)) {
      if (wd == WeightDecay::kNone) adam_moments<true, WeightDecay::kNone, true>(pi, gi, mi, vi, s);
      else if (wd == WeightDecay::kL2) adam_moments<true, WeightDecay::kL2, true>(pi, gi, mi, vi, s);
      else adam_moments<true, WeightDecay::kDecoupled, true>(pi, gi, mi, vi, s);
    } else {
      if (wd == WeightDecay::kNone) adam_moments<true, WeightDecay::kNone, false>(pi, gi, mi, vi, s);
      else if (wd == WeightDecay::kL2) adam_moments<true, WeightDecay::kL2, false>(pi, gi, mi, vi, s);
      else adam_moments<true, WeightDecay::kDecoupled, false>(pi, gi, mi, vi, s);
    }
    pi = adam_update(pi, mi, sqrt(vi), s);  // sqrt: correctly rounded (nvcc -prec-sqrt=true)
    p[i] = static_cast<T>(pi);
    m[i] = static_cast<T>(mi);
    v[i] = static_cast<T>(vi);
  }
}

}  // namespace

void sgd_step_cuda(Tensor& param, const Tensor& grad, std::optional<Tensor> momentum_buf,
                   double lr, double momentum, double weight_decay, bool first_step) {
  check_buffers("sgd_step_cuda", {{"param", &param}, {"grad", &grad}});
  TORCH_CHECK(param.is_cuda(), "sgd_step_cuda: tensors must be on a CUDA device");
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || momentum_buf.has_value(), "sgd_step_cuda: momentum ", momentum,
              " needs a momentum_buf");
  if (has_momentum) check_buffers("sgd_step_cuda", {{"param", &param}, {"momentum_buf", &*momentum_buf}});
  const c10::cuda::CUDAGuard guard(param.device());
  const int64_t n = param.numel();
  if (n == 0) return;
  const int blocks = grid_blocks(n, param.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "sgd_step_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const SgdScalars<acc_t> s{static_cast<acc_t>(-lr), static_cast<acc_t>(momentum),
                              static_cast<acc_t>(weight_decay), weight_decay != 0.0, has_momentum,
                              first_step};
    sgd_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        has_momentum ? momentum_buf->mutable_data_ptr<scalar_t>() : nullptr, n, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void adam_step_cuda(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled, double step_size, double bc2_sqrt) {
  check_buffers("adam_step_cuda", {{"param", &param}, {"grad", &grad}, {"exp_avg", &exp_avg},
                                   {"exp_avg_sq", &exp_avg_sq}});
  TORCH_CHECK(param.is_cuda(), "adam_step_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(param.device());
  const int64_t n = param.numel();
  if (n == 0) return;
  const int blocks = grid_blocks(n, param.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "adam_step_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const AdamScalars<T> s{static_cast<T>(1.0 - beta1),  static_cast<T>(beta2),
                           static_cast<T>(1.0 - beta2),  static_cast<T>(eps),
                           static_cast<T>(weight_decay), static_cast<T>(1.0 - lr * weight_decay),
                           static_cast<T>(-step_size),   static_cast<T>(bc2_sqrt),
                           weight_decay != 0.0,          decoupled};
    adam_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        param.mutable_data_ptr<scalar_t>(), grad.const_data_ptr<scalar_t>(),
        exp_avg.mutable_data_ptr<scalar_t>(), exp_avg_sq.mutable_data_ptr<scalar_t>(), n, s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace resalign
