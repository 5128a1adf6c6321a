"""Type stub of resalign_fast._C (csrc/bindings.cpp): the fused ops' C++/OpenMP CPU kernels, and the
CUDA kernels when the extension was built with CUDA. Call them through resalign_fast.ops, which
checks their inputs and picks a backend; these are the raw kernels."""

from torch import Tensor

def richardson_step_cpu(
    v: Tensor, b: Tensor, hv: Tensor, alpha: float, gamma: float, out: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]: ...
def fd_perturb_cpu(
    x: Tensor, v: Tensor, eps: float, out_plus: Tensor | None, out_minus: Tensor | None
) -> tuple[Tensor, Tensor]: ...
def fd_combine_cpu(g_plus: Tensor, g_minus: Tensor, eps: float, out: Tensor | None) -> Tensor: ...
def sgd_step_cpu(
    param: Tensor,
    grad: Tensor,
    momentum_buf: Tensor | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    first_step: bool,
    use_fma: bool,
) -> None: ...
def adam_step_cpu(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step_size: float,
    bc2_sqrt: float,
    use_fma: bool,
) -> None: ...

# present only in a CUDA build, with the CPU kernels' signatures (sgd and adam: without use_fma)
richardson_step_cuda = richardson_step_cpu
fd_perturb_cuda = fd_perturb_cpu
fd_combine_cuda = fd_combine_cpu

def sgd_step_cuda(
    param: Tensor,
    grad: Tensor,
    momentum_buf: Tensor | None,
    lr: float,
    momentum: float,
    weight_decay: float,
    first_step: bool,
) -> None: ...
def adam_step_cuda(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    step_size: float,
    bc2_sqrt: float,
) -> None: ...
def build_info() -> dict[str, str]: ...
