"""The build decision of setup.py, a pure-Python build, the built extension's metadata, and info."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from resalign_fast import info
from resalign_fast.ops import registry

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("resalign_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # __name__ != "__main__": defines, does not build
    yield module
    sys.modules.pop(spec.name, None)


CPU_TORCH = dict(
    torch_version="2.13.0+cpu", torch_cuda=None, cuda_available=False, cuda_home="/usr/local/cuda"
)
CUDA_TORCH = dict(
    torch_version="2.14.1+cu130",
    torch_cuda="13.0",
    cuda_available=False,
    cuda_home="/usr/local/cuda",
)


@pytest.mark.parametrize(
    "env,torch_facts,variants",
    [
        ({}, CPU_TORCH, ("cpu",)),  # nvcc present (cuda_home) but a CPU torch: no CUDA
        ({"FORCE_CUDA": "1"}, CPU_TORCH, ("cpu",)),  # cannot: torch has no CUDA
        ({}, CUDA_TORCH, ("cpu",)),  # CUDA torch, no GPU, not forced
        ({}, dict(CUDA_TORCH, cuda_available=True), ("cuda", "cpu")),
        ({"FORCE_CUDA": "1"}, CUDA_TORCH, ("cuda", "cpu")),
        ({"TORCH_CUDA_ARCH_LIST": "9.0"}, CUDA_TORCH, ("cuda", "cpu")),
        ({"FORCE_CUDA": "1"}, dict(CUDA_TORCH, cuda_home=None), ("cpu",)),  # no toolkit
        ({"RESALIGN_FAST_NO_EXTENSIONS": "1"}, dict(CUDA_TORCH, cuda_available=True), ()),
        ({}, dict(CPU_TORCH, torch_version=None), ()),  # torch not importable: pure Python
    ],
)
def test_decide_build(setup_py, env, torch_facts, variants):
    plan = setup_py.decide_build(env, **torch_facts)
    assert plan.variants == variants
    assert plan.notes  # every decision says why
    assert not plan.required


@pytest.mark.parametrize(
    "env,torch_facts,match",
    [
        (
            {"RESALIGN_FAST_NO_EXTENSIONS": "1", "RESALIGN_FAST_REQUIRE_EXTENSIONS": "1"},
            CPU_TORCH,
            "contradict",
        ),
        (
            {"RESALIGN_FAST_REQUIRE_EXTENSIONS": "1"},
            dict(CPU_TORCH, torch_version=None),
            "not importable",
        ),
        ({"RESALIGN_FAST_REQUIRE_EXTENSIONS": "1", "FORCE_CUDA": "1"}, CPU_TORCH, "CPU build"),
        (
            {"RESALIGN_FAST_REQUIRE_EXTENSIONS": "1", "FORCE_CUDA": "1"},
            dict(CUDA_TORCH, cuda_home=None),
            "toolkit",
        ),
    ],
)
def test_decide_build_required_failures_are_fatal(setup_py, env, torch_facts, match):
    with pytest.raises(RuntimeError, match=match):
        setup_py.decide_build(env, **torch_facts)


def test_required_flag_is_carried(setup_py):
    plan = setup_py.decide_build({"RESALIGN_FAST_REQUIRE_EXTENSIONS": "1"}, **CPU_TORCH)
    assert plan.variants == ("cpu",) and plan.required


def test_pure_python_build_ships_kernels_and_assets(tmp_path):
    """RESALIGN_FAST_NO_EXTENSIONS=1: no compiler runs; the kernels package, assets and configs
    are in."""
    env = dict(os.environ, RESALIGN_FAST_NO_EXTENSIONS="1")
    cmd = [
        sys.executable,
        str(ROOT / "setup.py"),
        "-q",
        "build",
        "--build-base",
        str(tmp_path / "b"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pure-Python install" in proc.stderr
    lib = tmp_path / "b" / "lib"
    assert (lib / "resalign_fast" / "kernels" / "__init__.py").is_file()
    assert (lib / "resalign_fast" / "ops" / "registry.py").is_file()
    assert not list(lib.rglob("*.so")), "an extension was built"
    pkg = ROOT / "resalign_fast"
    shipped = {
        p.relative_to(pkg)
        for p in (pkg / "assets").rglob("*")
        if p.suffix in (".safetensors", ".json", ".txt", ".csv")
    }
    shipped |= {p.relative_to(pkg) for p in pkg.rglob("*.toml")}
    assert shipped, "no assets in the checkout to check"
    for rel in shipped:
        assert (lib / "resalign_fast" / rel).is_file(), rel


def test_built_extension_metadata_matches_runtime():
    ext, error = registry.extension()
    if ext is None:
        pytest.skip(f"extension not built: {error}")
    meta = ext.build_info()
    assert meta["variant"] in ("cpu", "cuda")
    assert (
        (meta["cuda_ops"] == "yes")
        == (meta["variant"] == "cuda")
        == hasattr(ext, "richardson_step_cuda")
    )
    assert meta["torch_version"].split("+")[0] == torch.__version__.split("+")[0]
    assert meta["openmp"] != "no"


def test_info_prints_versions_build_and_op_table(capsys):
    assert info.main([]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    table = out.split("== ops x backends")[1]
    header = table.splitlines()[1].split()
    assert header[:5] == [
        "op",
        "cuda",
        "triton",
        "cpp",
        "torch",
    ]  # other ops may add backends after
    for op in ("richardson_step", "fd_perturb", "fd_combine", "sgd_step", "adam_step"):
        row = next(line.split() for line in table.splitlines() if line.split()[:1] == [op])
        cells = " ".join(row[1:]).replace("no [", "no[").split()
        assert cells[3] == "available"  # torch
        assert (cells[2] == "available") == (registry.extension()[0] is not None)  # cpp
