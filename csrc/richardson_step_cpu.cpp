// richardson_step on CPU: v_new = v + alpha (b - v - gamma hv) and the two squared norms, one pass.
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>

#include <vector>

#include "checks.h"
#include "cpu_loop.h"
#include "fused_math.h"
#include "ops.h"

namespace resalign {
namespace {

// Independent fp64 accumulators per chunk; fixed lane assignment keeps the sum deterministic.
constexpr int kLanes = 8;

template <typename T>
void richardson_range(const T* __restrict__ v, const T* __restrict__ b, const T* __restrict__ hv,
                      T* __restrict__ out, int64_t lo, int64_t hi, T alpha, T gamma, double* upd_sq,
                      double* vnew_sq) {
  double su[kLanes] = {0}, sn[kLanes] = {0};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T vi = v[i + l];
      const T vn = richardson_elem(vi, b[i + l], hv[i + l], alpha, gamma);
      out[i + l] = vn;
      const double d = static_cast<double>(vn - vi);
      su[l] += d * d;
      sn[l] += static_cast<double>(vn) * static_cast<double>(vn);
    }
  }
  for (int l = 0; i < hi; ++i, ++l) {
    const T vi = v[i];
    const T vn = richardson_elem(vi, b[i], hv[i], alpha, gamma);
    out[i] = vn;
    const double d = static_cast<double>(vn - vi);
    su[l] += d * d;
    sn[l] += static_cast<double>(vn) * static_cast<double>(vn);
  }
  double tu = 0, tn = 0;
  for (int l = 0; l < kLanes; ++l) {
    tu += su[l];
    tn += sn[l];
  }
  *upd_sq = tu;
  *vnew_sq = tn;
}

}  // namespace

TensorTriple richardson_step_cpu(const Tensor& v, const Tensor& b, const Tensor& hv, double alpha,
                                 double gamma, std::optional<Tensor> out_buf) {
  check_buffers("richardson_step_cpu", {{"v", &v}, {"b", &b}, {"hv", &hv}});
  TORCH_CHECK(v.device().is_cpu(), "richardson_step_cpu: tensors must be on the CPU");
  const int64_t n = v.numel();
  Tensor out = output_like(out_buf, v, "richardson_step_cpu");
  Tensor norms = at::empty({2}, v.options());
  std::vector<double> parts(2 * num_chunks(n), 0.0);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "richardson_step_cpu", [&] {
    const scalar_t* pv = v.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    const scalar_t* ph = hv.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    const auto a = static_cast<scalar_t>(alpha);
    const auto g = static_cast<scalar_t>(gamma);
    for_each_chunk(n, [&](int64_t c, int64_t lo, int64_t hi) {
      richardson_range(pv, pb, ph, po, lo, hi, a, g, &parts[2 * c], &parts[2 * c + 1]);
    });
    double tu = 0, tn = 0;
    for (size_t c = 0; c < parts.size(); c += 2) {
      tu += parts[c];
      tn += parts[c + 1];
    }
    scalar_t* pn = norms.mutable_data_ptr<scalar_t>();
    pn[0] = static_cast<scalar_t>(tu);
    pn[1] = static_cast<scalar_t>(tn);
  });
  return {out, norms.select(0, 0), norms.select(0, 1)};
}

}  // namespace resalign
