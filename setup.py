"""Build and install resalign_fast.

    pip install torch==2.13.0                 # first: the build needs the torch it will run with
    pip install --no-build-isolation .        # build isolation cannot see the installed torch

The native extension resalign_fast._C is optional and built through torch.utils.cpp_extension
with ninja: C++/OpenMP CPU kernels always, CUDA kernels when torch is a CUDA build and CUDA is
present (a visible GPU) or forced (FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST set), never merely
because nvcc exists. Environment knobs:

    RESALIGN_FAST_NO_EXTENSIONS=1       pure-Python install (every op falls back to torch)
    RESALIGN_FAST_REQUIRE_EXTENSIONS=1  a failed or impossible extension build is an error
    FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST  build the CUDA kernels without a visible GPU
    CUDA_HOME, MAX_JOBS                 as torch.utils.cpp_extension reads them

Without those, a failed build warns and falls back (CUDA -> CPU-only -> pure Python).
`decide_build` holds the decision and is unit-tested (tests/ops/test_build.py).
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
CPU_SOURCES = [
    "bindings.cpp",
    "build_info.cpp",
    "richardson_step_cpu.cpp",
    "fd_hvp_cpu.cpp",
    "optim_step_cpu.cpp",
]
CUDA_SOURCES = ["richardson_step_cuda.cu", "fd_hvp_cuda.cu", "optim_step_cuda.cu"]
# -ffp-contract=off / --fmad=false: no multiply-add fusion the source does not ask for, so the
# kernels round exactly where the torch references round (fused_math.h asks for the fused ones).
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
LINK_FLAGS = ["-fopenmp"]


def _on(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class BuildPlan:
    """What to build.

    Attributes:
        variants: extension variants to try in order ("cuda", "cpu"); empty: pure Python.
        required: a failure is fatal (RESALIGN_FAST_REQUIRE_EXTENSIONS=1).
        notes: why, one line each (printed during the build).
    """

    variants: tuple[str, ...]
    required: bool
    notes: tuple[str, ...] = field(default_factory=tuple)


def decide_build(
    env: Mapping[str, str],
    *,
    torch_version: str | None,
    torch_cuda: str | None,
    cuda_available: bool,
    cuda_home: str | None,
) -> BuildPlan:
    """Decides which extension variants to build.

    Args:
        env: environment variables.
        torch_version: torch.__version__, None when torch cannot be imported.
        torch_cuda: torch.version.cuda (None for a CPU build of torch).
        cuda_available: torch.cuda.is_available().
        cuda_home: the CUDA toolkit torch found (torch.utils.cpp_extension.CUDA_HOME), or None.

    Returns:
        The plan.

    Raises:
        RuntimeError: RESALIGN_FAST_REQUIRE_EXTENSIONS=1 and the requested build is impossible,
            or contradicting knobs.
    """
    required = _on(env, "RESALIGN_FAST_REQUIRE_EXTENSIONS")

    def fail_or(note: str, plan: BuildPlan, fatal: bool) -> BuildPlan:
        if fatal:
            raise RuntimeError(note)
        return plan

    if _on(env, "RESALIGN_FAST_NO_EXTENSIONS"):
        note = "RESALIGN_FAST_NO_EXTENSIONS=1"
        return fail_or(
            f"{note} and RESALIGN_FAST_REQUIRE_EXTENSIONS=1 contradict each other",
            BuildPlan((), False, (f"{note}: pure-Python install",)),
            required,
        )
    if torch_version is None:
        note = (
            "torch is not importable at build time: pure-Python install "
            "(install torch first, then pip install --no-build-isolation .)"
        )
        return fail_or(note, BuildPlan((), False, (note,)), required)
    forced = _on(env, "FORCE_CUDA") or bool(env.get("TORCH_CUDA_ARCH_LIST", "").strip())
    cpu_only = f"torch {torch_version}: C++ CPU kernels only"
    if torch_cuda is None:
        if forced:
            note = (
                "CUDA requested (FORCE_CUDA/TORCH_CUDA_ARCH_LIST) but torch "
                f"{torch_version} is a CPU build"
            )
            return fail_or(note, BuildPlan(("cpu",), required, (note, cpu_only)), required)
        return BuildPlan(("cpu",), required, (f"{cpu_only} (a CPU build of torch)",))
    if not (cuda_available or forced):
        why = (
            f"CUDA {torch_cuda} build, no visible GPU, "
            "neither FORCE_CUDA=1 nor TORCH_CUDA_ARCH_LIST set"
        )
        return BuildPlan(("cpu",), required, (f"{cpu_only} ({why})",))
    if cuda_home is None:
        note = "CUDA wanted but no CUDA toolkit found (set CUDA_HOME)"
        return fail_or(note, BuildPlan(("cpu",), required, (note, cpu_only)), required and forced)
    note = f"torch {torch_version} + CUDA {torch_cuda} at {cuda_home}: CPU and CUDA kernels"
    return BuildPlan(("cuda", "cpu"), required, (note,))


def _probe_torch() -> dict:
    """Facts about the installed torch that decide_build needs (all None/False without torch)."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except ImportError:
        return dict(torch_version=None, torch_cuda=None, cuda_available=False, cuda_home=None)
    return dict(
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        cuda_home=CUDA_HOME,
    )


def make_extension(variant: str):
    """The Extension of one variant ("cpu" or "cuda")."""
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    csrc = ROOT / "csrc"
    common = dict(name="resalign_fast._C", include_dirs=[str(csrc)], extra_link_args=LINK_FLAGS)
    if variant == "cpu":
        return CppExtension(
            sources=[f"csrc/{s}" for s in CPU_SOURCES],
            extra_compile_args={"cxx": CXX_FLAGS},
            **common,
        )
    return CUDAExtension(
        sources=[f"csrc/{s}" for s in CPU_SOURCES + CUDA_SOURCES],
        define_macros=[("RESALIGN_WITH_CUDA", None)],
        extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
        **common,
    )


def _cuda_arch_list(variant: str) -> str:
    if variant != "cuda":
        return ""
    try:  # the -gencode flags torch will pass (private API; informational only)
        from torch.utils.cpp_extension import _get_cuda_arch_flags

        return " ".join(_get_cuda_arch_flags())
    except Exception:  # noqa: BLE001 - metadata must never break the build
        return os.environ.get("TORCH_CUDA_ARCH_LIST", "torch default")


def write_build_info(path: Path, variant: str, build_system: str) -> None:
    """Writes resalign_build_info.h (from csrc/build_info.h.in) for csrc/build_info.cpp."""
    import torch

    values = {
        "RESALIGN_BUILD_VARIANT": variant,
        "RESALIGN_BUILD_SYSTEM": build_system,
        "RESALIGN_CXX_FLAGS": " ".join(CXX_FLAGS),
        "RESALIGN_NVCC_FLAGS": " ".join(NVCC_FLAGS) if variant == "cuda" else "",
        "RESALIGN_CUDA_ARCH_LIST": _cuda_arch_list(variant),
        "RESALIGN_TORCH_VERSION": torch.__version__,
        "RESALIGN_TORCH_CUDA_VERSION": torch.version.cuda or "",
    }
    text = (ROOT / "csrc" / "build_info.h.in").read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value.replace("\\", "\\\\").replace('"', '\\"'))
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _cmdclass(plan: BuildPlan) -> dict:
    if not plan.variants:
        return {}
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """Builds the first variant of the plan that compiles; warns (or fails) on each failure."""

        def build_extensions(self):
            planned = self.extensions[0]
            for i, variant in enumerate(plan.variants):
                ext = make_extension(variant)
                for attr in ("_full_name", "_links_to_dynamic", "_needs_stub", "_file_name"):
                    if hasattr(planned, attr):  # set by setuptools' finalize_options
                        setattr(ext, attr, getattr(planned, attr))
                generated = Path(self.build_temp).resolve() / "generated"
                write_build_info(generated / "resalign_build_info.h", variant, "setuptools")
                ext.include_dirs.append(str(generated))
                self.extensions = [ext]
                try:
                    super().build_extensions()
                    print(f"resalign_fast: built resalign_fast._C ({variant})")
                    return
                except Exception as exc:  # noqa: BLE001 - compiler and linker errors vary
                    if plan.required:
                        raise
                    nxt = plan.variants[i + 1] if i + 1 < len(plan.variants) else None
                    then = (
                        f"trying the {nxt} variant"
                        if nxt
                        else "installing pure Python (ops fall back to torch)"
                    )
                    warnings.warn(
                        f"resalign_fast: building the {variant} extension failed ({exc}); {then}",
                        stacklevel=2,
                    )
            self.extensions = []

    return {"build_ext": BuildExt.with_options(use_ninja=True)}


def _version() -> str:
    text = (ROOT / "resalign_fast" / "__init__.py").read_text()
    return re.search(r'^__version__\s*=\s*"([^"]+)"', text, re.M).group(1)


def main() -> None:
    plan = decide_build(os.environ, **_probe_torch())
    for note in plan.notes:
        print(f"resalign_fast: {note}", file=sys.stderr)
    setup(
        name="resalign_fast",
        version=_version(),
        description="ResAlign: resilient safety unlearning for diffusion models, fast and lean",
        python_requires=">=3.11",
        packages=find_packages(include=["resalign_fast", "resalign_fast.*"])
        + ["resalign_fast.kernels"],
        package_dir={"resalign_fast.kernels": "kernels"},
        # Data shipped inside the package: model assets and the TOML run configurations.
        package_data={
            "resalign_fast": [f"assets/**/*.{ext}" for ext in ("safetensors", "json", "txt", "csv")]
            + ["**/*.toml", "_C.pyi"]
        },
        include_package_data=False,
        # No torch pin: the README installs torch==2.13.0 (CPU) first; a pin here would make pip
        # fetch the CUDA build of another version.
        install_requires=[
            "torch",
            "numpy",
            "safetensors",
            "diffusers>=0.30",
            "transformers",
            "peft",
            "pillow",
            "scikit-learn",
        ],
        extras_require={
            "gpu": ["triton", "xformers"],
            "deepspeed": ["deepspeed"],
            "test": ["pytest", "pytest-benchmark"],
            "build": ["ninja", "pybind11"],
        },
        ext_modules=[make_extension(plan.variants[0])] if plan.variants else [],
        cmdclass=_cmdclass(plan),
        zip_safe=False,
    )


if __name__ == "__main__":
    main()
