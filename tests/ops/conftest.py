"""Fixtures of the fused-op tests.

Triton on a machine without a GPU runs in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported. When this pytest process did not start that
way, the CPU Triton cases (parameter backend="triton") of TRITON_FILES run once, together, in a
child pytest with TRITON_INTERPRET=1, and each case here reports the child's outcome for it (pass,
failure with its message, or skip) instead of running its body: `pytest_pyfunc_call` below.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from _ops_testing import DTYPES, TRITON_CHILD_ENV, device_for, needs_triton_child

HERE = Path(__file__).resolve().parent
# The test files whose Triton cases the child runs (every file with cases of a `backend` parameter).
TRITON_FILES = ["test_richardson_step.py", "test_fd_hvp.py", "test_optim_step.py"]


class TritonChild:
    """Outcomes of the CPU Triton cases, from one child pytest run under TRITON_INTERPRET=1."""

    def __init__(self, tmp: Path):
        self._tmp = tmp
        self._results: dict[tuple[str, str], tuple[str, str]] | None = None
        self._log = ""

    def _run(self) -> None:
        xml = self._tmp / "triton.xml"
        env = dict(os.environ, TRITON_INTERPRET="1", **{TRITON_CHILD_ENV: "1"})
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "triton",
            f"--junitxml={xml}",
            *[str(HERE / f) for f in TRITON_FILES],
        ]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        self._log = (proc.stdout + proc.stderr)[-4000:]
        self._results = {}
        if not xml.exists():
            return
        for case in ET.parse(xml).getroot().iter("testcase"):
            key = (case.get("classname", "").rsplit(".", 1)[-1], case.get("name", ""))
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error"):
                    outcome, message = (
                        "failed",
                        (child.get("message", "") + "\n" + (child.text or ""))[-3000:],
                    )
                elif child.tag == "skipped":
                    outcome, message = "skipped", child.get("message", "")
            self._results[key] = outcome, message

    def report(self, node: pytest.Item) -> None:
        """Passes, fails or skips as the child's run of the same case did."""
        if self._results is None:
            self._run()
        key = (Path(node.fspath).stem, node.name)
        if key not in self._results:
            pytest.fail(
                f"the Triton child run has no result for {node.name}; its output:\n{self._log}"
            )
        outcome, message = self._results[key]
        if outcome == "failed":
            pytest.fail(f"under TRITON_INTERPRET=1 (child process): {message}")
        if outcome == "skipped":
            pytest.skip(message)


@pytest.fixture(scope="module")
def one_thread():
    """torch (and the C++ kernels) on one thread: on the shared 2-core CI machine two OpenMP threads
    are several times slower than one (oversubscription). test_threads_agree covers 2 threads."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


_TRITON_CHILD = pytest.StashKey[TritonChild]()


def _triton_child(config: pytest.Config) -> TritonChild:
    """The session's TritonChild, made on first use; its folder goes when the session ends."""
    if os.environ.get(TRITON_CHILD_ENV) == "1":
        raise RuntimeError("the Triton child must not start another child (interpreter inactive?)")
    if _TRITON_CHILD not in config.stash:
        folder = tempfile.TemporaryDirectory(prefix="triton_child")
        config.add_cleanup(folder.cleanup)
        config.stash[_TRITON_CHILD] = TritonChild(Path(folder.name))
    return config.stash[_TRITON_CHILD]


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """A CPU Triton case that needs the interpreter this process lacks reports the child's outcome
    (True: the call is done); every other case runs as usual (None)."""
    callspec = getattr(pyfuncitem, "callspec", None)
    params = callspec.params if callspec is not None else {}
    if params.get("backend") != "triton" or Path(pyfuncitem.path).name not in TRITON_FILES:
        return None
    device = device_for("triton", DTYPES[params.get("dtype_name", "float64")])  # may skip
    if not needs_triton_child("triton", device):
        return None
    _triton_child(pyfuncitem.config).report(pyfuncitem)
    return True
