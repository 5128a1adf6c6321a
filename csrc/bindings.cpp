// Python bindings of resalign_fast._C: registration only, no logic.
#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resalign_fast fused ops (C++/OpenMP CPU kernels, CUDA kernels when built with CUDA)";
  m.def("richardson_step_cpu", &resalign::richardson_step_cpu);
  m.def("fd_perturb_cpu", &resalign::fd_perturb_cpu);
  m.def("fd_combine_cpu", &resalign::fd_combine_cpu);
  m.def("sgd_step_cpu", &resalign::sgd_step_cpu);
  m.def("adam_step_cpu", &resalign::adam_step_cpu);
#ifdef RESALIGN_WITH_CUDA
  m.def("richardson_step_cuda", &resalign::richardson_step_cuda);
  m.def("fd_perturb_cuda", &resalign::fd_perturb_cuda);
  m.def("fd_combine_cuda", &resalign::fd_combine_cuda);
  m.def("sgd_step_cuda", &resalign::sgd_step_cuda);
  m.def("adam_step_cuda", &resalign::adam_step_cuda);
#endif
  m.def("build_info", &resalign::build_info);
}
