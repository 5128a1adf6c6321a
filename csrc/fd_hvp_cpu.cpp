// Finite-difference HVP arithmetic on CPU: x +- eps v (one pass) and (g+ - g-) / (2 eps).
#include <ATen/Dispatch.h>

#include "checks.h"
#include "cpu_loop.h"
#include "ops.h"

namespace resalign {

TensorPair fd_perturb_cpu(const Tensor& x, const Tensor& v, double eps, std::optional<Tensor> out_plus,
                          std::optional<Tensor> out_minus) {
  check_buffers("fd_perturb_cpu", {{"x", &x}, {"v", &v}});
  TORCH_CHECK(x.device().is_cpu(), "fd_perturb_cpu: tensors must be on the CPU");
  Tensor plus = output_like(out_plus, x, "fd_perturb_cpu");
  Tensor minus = output_like(out_minus, x, "fd_perturb_cpu");
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fd_perturb_cpu", [&] {
    const scalar_t* __restrict__ px = x.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ pv = v.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ pp = plus.mutable_data_ptr<scalar_t>();
    scalar_t* __restrict__ pm = minus.mutable_data_ptr<scalar_t>();
    const auto e = static_cast<scalar_t>(eps);
    for_each_chunk(x.numel(), [&](int64_t, int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        const scalar_t t = e * pv[i];
        pp[i] = px[i] + t;
        pm[i] = px[i] - t;
      }
    });
  });
  return {plus, minus};
}

Tensor fd_combine_cpu(const Tensor& g_plus, const Tensor& g_minus, double eps, std::optional<Tensor> out) {
  check_buffers("fd_combine_cpu", {{"g_plus", &g_plus}, {"g_minus", &g_minus}});
  TORCH_CHECK(g_plus.device().is_cpu(), "fd_combine_cpu: tensors must be on the CPU");
  Tensor hv = output_like(out, g_plus, "fd_combine_cpu");
  AT_DISPATCH_FLOATING_TYPES(g_plus.scalar_type(), "fd_combine_cpu", [&] {
    const scalar_t* __restrict__ pp = g_plus.const_data_ptr<scalar_t>();
    const scalar_t* __restrict__ pm = g_minus.const_data_ptr<scalar_t>();
    scalar_t* __restrict__ po = hv.mutable_data_ptr<scalar_t>();
    const auto two_eps = static_cast<scalar_t>(2.0 * eps);
    for_each_chunk(g_plus.numel(), [&](int64_t, int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) po[i] = (pp[i] - pm[i]) / two_eps;
    });
  });
  return hv;
}

}  // namespace resalign
