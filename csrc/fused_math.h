// Element-wise arithmetic shared by the CPU (.cpp) and CUDA (.cu) kernels, so that both follow one
// definition. The operation order mirrors the PyTorch reference chains in resalign_fast/ops/*.py.
//
// kFma selects whether the steps that torch's CPU kernels compute with a fused multiply-add
// (`add(.., alpha=)`, `lerp`, `addcmul`: Vectorized::fmadd on AVX2/AVX512) are fused here too.
// That is what makes the CPU optimizer steps bit-identical to torch.optim (tests/ops/test_optim_step.py).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace resalign {

C10_HOST_DEVICE C10_ALWAYS_INLINE float fma_rn(float a, float b, float c) { return fmaf(a, b, c); }
C10_HOST_DEVICE C10_ALWAYS_INLINE double fma_rn(double a, double b, double c) { return fma(a, b, c); }

// a * b + c, rounded once (kFma) or twice.
template <bool kFma, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T madd(T a, T b, T c) {
  if constexpr (kFma) {
    return fma_rn(a, b, c);
  } else {
    return a * b + c;
  }
}

// v_new = v + alpha * ((b - v) - gamma * hv): the order of `v + alpha * (b - v - gamma * hv)`.
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T richardson_elem(T v, T b, T hv, T alpha, T gamma) {
  const T r = (b - v) - gamma * hv;
  return v + alpha * r;
}

// Scalars of one SGD step, already rounded to the compute type as torch rounds them.
template <typename T>
struct SgdScalars {
  T neg_lr;        // -lr
  T momentum;
  T weight_decay;
  bool has_weight_decay;
  bool has_momentum;
  bool first_step;
};

// torch.optim.SGD (_single_tensor_sgd, dampening 0, no nesterov) for one element.
template <bool kFma, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void sgd_elem(T& p, T g, T& buf, const SgdScalars<T>& s) {
  if (s.has_weight_decay) g = madd<kFma>(s.weight_decay, p, g);  // grad.add(param, alpha=wd)
  if (s.has_momentum) {
    // buf = grad.clone() on the first step, else buf.mul_(momentum).add_(grad) (alpha 1: exact)
    buf = s.first_step ? g : buf * s.momentum + g;
    g = buf;
  }
  p = madd<kFma>(s.neg_lr, g, p);  // param.add_(grad, alpha=-lr)
}

// Scalars of one Adam/AdamW step, already rounded to the compute type as torch rounds them.
template <typename T>
struct AdamScalars {
  T lerp_weight;   // 1 - beta1
  T beta2;
  T one_minus_beta2;
  T eps;
  T weight_decay;  // L2 coefficient (decoupled == false)
  T decay;         // 1 - lr * weight_decay (decoupled == true)
  T neg_step_size; // -lr / (1 - beta1 ** step)
  T bc2_sqrt;      // sqrt(1 - beta2 ** step)
  bool has_weight_decay;
  bool decoupled;
};

enum class WeightDecay { kNone, kL2, kDecoupled };

// torch.optim.Adam / AdamW (_single_tensor_adam, no amsgrad) for one element, in two halves
// around the square root of the new exp_avg_sq (the CPU kernels take that from torch's own sqrt,
// which is not correctly rounded on MKL builds). First half: weight decay and both moments.
// kSmallWeight: |1 - beta1| < 0.5, which selects torch's lerp formula. Compile-time switches keep
// the CPU loops free of branches (vectorized).
template <bool kFma, WeightDecay kWd, bool kSmallWeight, typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE void adam_moments(T& p, T g, T& m, T& v, const AdamScalars<T>& s) {
  if constexpr (kWd == WeightDecay::kDecoupled) {
    p = p * s.decay;                        // param.mul_(1 - lr * wd)
  } else if constexpr (kWd == WeightDecay::kL2) {
    g = madd<kFma>(s.weight_decay, p, g);   // grad.add(param, alpha=wd)
  }
  // exp_avg.lerp_(grad, w): torch's lerp, start + w (end - start) or end + (w - 1) (end - start)
  const T diff = g - m;
  if constexpr (kSmallWeight) {
    m = madd<kFma>(s.lerp_weight, diff, m);
  } else {
    m = madd<kFma>(s.lerp_weight - T(1), diff, g);
  }
  // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
  v = madd<kFma>(s.one_minus_beta2 * g, g, v * s.beta2);
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE WeightDecay weight_decay_mode(const AdamScalars<T>& s) {
  return !s.has_weight_decay ? WeightDecay::kNone : (s.decoupled ? WeightDecay::kDecoupled : WeightDecay::kL2);
}

template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE bool small_lerp_weight(const AdamScalars<T>& s) {
  return s.lerp_weight < T(0.5) && s.lerp_weight > T(-0.5);  // torch's is_lerp_weight_small
}

// Second half: denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps);
// param.addcdiv_(exp_avg, denom, value=-step_size).
template <typename T>
C10_HOST_DEVICE C10_ALWAYS_INLINE T adam_update(T p, T m, T sqrt_v, const AdamScalars<T>& s) {
  const T denom = sqrt_v / s.bc2_sqrt + s.eps;
  return p + (s.neg_step_size * m) / denom;
}

}  // namespace resalign
