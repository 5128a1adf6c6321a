// Fused SGD and Adam/AdamW steps on CPU, in place, bit-identical to torch.optim's single-tensor
// implementation: the same operation order (fused_math.h) and the same multiply-add fusion as
// torch's CPU kernels (use_fma, decided in Python from torch's CPU capability).
#include <ATen/Dispatch.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/sqrt.h>

#include <vector>

#include "checks.h"
#include "cpu_loop.h"
#include "fused_math.h"
#include "ops.h"

namespace resalign {
namespace {

// Always inlined, so that the *_fma_isa callers compile the loop with FMA instructions.
template <bool kFma, typename T>
C10_ALWAYS_INLINE void sgd_range(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
                                 int64_t lo, int64_t hi, const SgdScalars<T>& s) {
  if (buf != nullptr) {
    for (int64_t i = lo; i < hi; ++i) sgd_elem<kFma>(p[i], g[i], buf[i], s);
  } else {
    for (int64_t i = lo; i < hi; ++i) {
      T unused = T(0);
      sgd_elem<kFma>(p[i], g[i], unused, s);
    }
  }
}

template <typename T>
RESALIGN_TARGET_FMA void sgd_range_fma_isa(T* p, const T* g, T* buf, int64_t lo, int64_t hi,
                                           const SgdScalars<T>& s) {
  sgd_range<true>(p, g, buf, lo, hi, s);
}

template <bool kFma, WeightDecay kWd, bool kSmall, typename T>
C10_ALWAYS_INLINE void adam_moments_range(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ m,
                                          T* __restrict__ v, int64_t lo, int64_t hi, const AdamScalars<T>& s) {
  for (int64_t i = lo; i < hi; ++i) adam_moments<kFma, kWd, kSmall>(p[i], g[i], m[i], v[i], s);
}

template <WeightDecay kWd, bool kSmall, typename T>
RESALIGN_TARGET_FMA void adam_moments_range_fma_isa(T* p, const T* g, T* m, T* v, int64_t lo, int64_t hi,
                                                    const AdamScalars<T>& s) {
  adam_moments_range<true, kWd, kSmall>(p, g, m, v, lo, hi, s);
}

template <WeightDecay kWd, bool kSmall, typename T>
void adam_moments_dispatch_fma(T* p, const T* g, T* m, T* v, int64_t lo, int64_t hi, const AdamScalars<T>& s,
                               bool use_fma) {
  if (!use_fma) {
    adam_moments_range<false, kWd, kSmall>(p, g, m, v, lo, hi, s);
  } else if (cpu_has_fma()) {
    adam_moments_range_fma_isa<kWd, kSmall>(p, g, m, v, lo, hi, s);
  } else {
    adam_moments_range<true, kWd, kSmall>(p, g, m, v, lo, hi, s);  // software fma(): exact, slower
  }
}

template <bool kSmall, typename T>
void adam_moments_dispatch(T* p, const T* g, T* m, T* v, int64_t lo, int64_t hi, const AdamScalars<T>& s,
                           bool use_fma) {
  switch (weight_decay_mode(s)) {
    case WeightDecay::kNone:
      return adam_moments_dispatch_fma<WeightDecay::kNone, kSmall>(p, g, m, v, lo, hi, s, use_fma);
    case WeightDecay::kL2:
      return adam_moments_dispatch_fma<WeightDecay::kL2, kSmall>(p, g, m, v, lo, hi, s, use_fma);
    case WeightDecay::kDecoupled:
      return adam_moments_dispatch_fma<WeightDecay::kDecoupled, kSmall>(p, g, m, v, lo, hi, s, use_fma);
  }
}

template <typename T>
void adam_update_range(T* __restrict__ p, const T* __restrict__ m, const T* __restrict__ root, int64_t n,
                       const AdamScalars<T>& s) {
  for (int64_t i = 0; i < n; ++i) p[i] = adam_update(p[i], m[i], root[i], s);
}

// One chunk: fused moment updates, torch's sqrt of the chunk of exp_avg_sq (cache-resident; the
// same kernel as torch.optim's exp_avg_sq.sqrt(), whose MKL/VML results differ from IEEE sqrt in
// ~16% of fp32 elements by 1 ulp), then the fused parameter update.
template <typename T>
void adam_chunk(T* p, const T* g, T* m, T* v, int64_t lo, int64_t hi, const AdamScalars<T>& s,
                bool use_fma, const at::TensorOptions& options) {
  if (small_lerp_weight(s)) {
    adam_moments_dispatch<true>(p, g, m, v, lo, hi, s, use_fma);
  } else {
    adam_moments_dispatch<false>(p, g, m, v, lo, hi, s, use_fma);
  }
  thread_local std::vector<T> root;
  root.resize(kChunk);
  const int64_t len = hi - lo;
  at::Tensor root_t = at::from_blob(root.data(), {len}, options);
  at::sqrt_out(root_t, at::from_blob(v + lo, {len}, options));
  adam_update_range(p + lo, m + lo, root.data(), len, s);
}

}  // namespace

void sgd_step_cpu(Tensor& param, const Tensor& grad, std::optional<Tensor> momentum_buf, double lr,
                  double momentum, double weight_decay, bool first_step, bool use_fma) {
  check_buffers("sgd_step_cpu", {{"param", &param}, {"grad", &grad}});
  TORCH_CHECK(param.device().is_cpu(), "sgd_step_cpu: tensors must be on the CPU");
  const bool has_momentum = momentum != 0.0;
  TORCH_CHECK(!has_momentum || momentum_buf.has_value(), "sgd_step_cpu: momentum ", momentum,
              " needs a momentum_buf");
  if (has_momentum) check_buffers("sgd_step_cpu", {{"param", &param}, {"momentum_buf", &*momentum_buf}});
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "sgd_step_cpu", [&] {
    const SgdScalars<scalar_t> s{static_cast<scalar_t>(-lr), static_cast<scalar_t>(momentum),
                                 static_cast<scalar_t>(weight_decay), weight_decay != 0.0,
                                 has_momentum, first_step};
    scalar_t* p = param.mutable_data_ptr<scalar_t>();
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    scalar_t* b = has_momentum ? momentum_buf->mutable_data_ptr<scalar_t>() : nullptr;
    for_each_chunk(param.numel(), [&](int64_t, int64_t lo, int64_t hi) {
      if (!use_fma) {
        sgd_range<false>(p, g, b, lo, hi, s);
      } else if (cpu_has_fma()) {
        sgd_range_fma_isa(p, g, b, lo, hi, s);
      } else {
        sgd_range<true>(p, g, b, lo, hi, s);  // software fma(): exact, slower
      }
    });
  });
}

void adam_step_cpu(Tensor& param, const Tensor& grad, Tensor& exp_avg, Tensor& exp_avg_sq,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool decoupled, double step_size, double bc2_sqrt, bool use_fma) {
  check_buffers("adam_step_cpu", {{"param", &param}, {"grad", &grad}, {"exp_avg", &exp_avg},
                                  {"exp_avg_sq", &exp_avg_sq}});
  TORCH_CHECK(param.device().is_cpu(), "adam_step_cpu: tensors must be on the CPU");
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "adam_step_cpu", [&] {
    using T = scalar_t;
    const AdamScalars<T> s{static_cast<T>(1.0 - beta1),   static_cast<T>(beta2),
                           static_cast<T>(1.0 - beta2),   static_cast<T>(eps),
                           static_cast<T>(weight_decay),  static_cast<T>(1.0 - lr * weight_decay),
                           static_cast<T>(-step_size),    static_cast<T>(bc2_sqrt),
                           weight_decay != 0.0,           decoupled};
    T* p = param.mutable_data_ptr<T>();
    const T* g = grad.const_data_ptr<T>();
    T* m = exp_avg.mutable_data_ptr<T>();
    T* v = exp_avg_sq.mutable_data_ptr<T>();
    const at::TensorOptions options = param.options();
    for_each_chunk(param.numel(), [&](int64_t, int64_t lo, int64_t hi) {
      adam_chunk(p, g, m, v, lo, hi, s, use_fma, options);
    });
  });
}

}  // namespace resalign
