// Python bindings of resalign_fast._C: registration only, no logic.
#include <torch/extension.h>

#include "ops.h"

namespace py = pybind11;

// Argument names match csrc/ops.h and resalign_fast/_C.pyi
// (tests/ops/test_bindings.py checks the stub against the built module).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resalign_fast fused ops (C++/OpenMP CPU kernels, CUDA kernels when built with CUDA)";
  m.def("richardson_step_cpu", &resalign::richardson_step_cpu,
        py::arg("v"), py::arg("b"), py::arg("hv"), py::arg("alpha"), py::arg("gamma"), py::arg("out"));
  m.def("fd_perturb_cpu", &resalign::fd_perturb_cpu,
        py::arg("x"), py::arg("v"), py::arg("eps"), py::arg("out_plus"), py::arg("out_minus"));
  m.def("fd_combine_cpu", &resalign::fd_combine_cpu,
        py::arg("g_plus"), py::arg("g_minus"), py::arg("eps"), py::arg("out"));
  m.def("sgd_step_cpu", &resalign::sgd_step_cpu,
        py::arg("param"), py::arg("grad"), py::arg("momentum_buf"), py::arg("lr"), py::arg("momentum"),
        py::arg("weight_decay"), py::arg("first_step"), py::arg("use_fma"));
  m.def("adam_step_cpu", &resalign::adam_step_cpu,
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
        py::arg("step_size"), py::arg("bc2_sqrt"), py::arg("use_fma"));
#ifdef RESALIGN_WITH_CUDA
  m.def("richardson_step_cuda", &resalign::richardson_step_cuda,
        py::arg("v"), py::arg("b"), py::arg("hv"), py::arg("alpha"), py::arg("gamma"), py::arg("out"));
  m.def("fd_perturb_cuda", &resalign::fd_perturb_cuda,
        py::arg("x"), py::arg("v"), py::arg("eps"), py::arg("out_plus"), py::arg("out_minus"));
  m.def("fd_combine_cuda", &resalign::fd_combine_cuda,
        py::arg("g_plus"), py::arg("g_minus"), py::arg("eps"), py::arg("out"));
  m.def("sgd_step_cuda", &resalign::sgd_step_cuda,
        py::arg("param"), py::arg("grad"), py::arg("momentum_buf"), py::arg("lr"), py::arg("momentum"),
        py::arg("weight_decay"), py::arg("first_step"));
  m.def("adam_step_cuda", &resalign::adam_step_cuda,
        py::arg("param"), py::arg("grad"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
        py::arg("step_size"), py::arg("bc2_sqrt"));
#endif
  m.def("build_info", &resalign::build_info);
}
