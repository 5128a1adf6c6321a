// Declarations of the fused ops. Every op works on flat contiguous buffers of equal size and dtype;
// the Python wrappers in resalign_fast/ops/ validate the arguments and compute the scalars.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

#include <string>
#include <tuple>
#include <unordered_map>

namespace resalign {

using Tensor = at::Tensor;
using TensorPair = std::tuple<Tensor, Tensor>;
using TensorTriple = std::tuple<Tensor, Tensor, Tensor>;

// Returns (v_new, ||v_new - v||^2, ||v_new||^2); the norms are 0-d tensors accumulated in fp64.
// `out` arguments: optional caller-owned output buffers (reused buffers skip the allocation, which
// on CPU costs more than the arithmetic: ~20 ms of page faults per 40 MB here).
TensorTriple richardson_step_cpu(const Tensor& v, const Tensor& b, const Tensor& hv, double alpha,
                                 double gamma, std::optional<Tensor> out);
TensorPair fd_perturb_cpu(const Tensor& x, const Tensor& v, double eps, std::optional<Tensor> out_plus,
                          std::optional<Tensor> out_minus);
Tensor fd_combine_cpu(const Tensor& g_plus, const Tensor& g_minus, double eps, std::optional<Tensor> out);
// In place on param (and momentum_buf). use_fma: torch's CPU kernels fuse multiply-adds.
void sgd_step_cpu(Tensor& param, const Tensor& grad, std::optional<Tensor> momentum_buf, double lr,
                  double momentum, double weight_decay, bool first_step, bool use_fma);
// In place on param, exp_avg, exp_avg_sq; step_size = lr / (1 - beta1**step),
// bc2_sqrt = (1 - beta2**step) ** 0.5 as torch.optim computes them in Python.
void adam_step_cpu(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool decoupled, double step_size, double bc2_sqrt, bool use_fma);

#ifdef RESALIGN_WITH_CUDA
TensorTriple richardson_step_cuda(const Tensor& v, const Tensor& b, const Tensor& hv, double alpha,
                                  double gamma, std::optional<Tensor> out);
TensorPair fd_perturb_cuda(const Tensor& x, const Tensor& v, double eps, std::optional<Tensor> out_plus,
                           std::optional<Tensor> out_minus);
Tensor fd_combine_cuda(const Tensor& g_plus, const Tensor& g_minus, double eps, std::optional<Tensor> out);
void sgd_step_cuda(Tensor& param, const Tensor& grad, std::optional<Tensor> momentum_buf,
                   double lr, double momentum, double weight_decay, bool first_step);
void adam_step_cuda(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled, double step_size, double bc2_sqrt);
#endif

// What was built and how: variant, flags, CUDA arch list, compiler, torch version built against.
std::unordered_map<std::string, std::string> build_info();

}  // namespace resalign
