"""Fixtures of the fused-op tests.

Triton on a machine without a GPU runs in Triton's interpreter, which must be switched on
(TRITON_INTERPRET=1) before triton is first imported. When this pytest process did not start that
way, the CPU Triton cases run once, together, in a child pytest with TRITON_INTERPRET=1, and each
case here reports the child's outcome for it (pass, failure with its message, or skip).
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from _ops_testing import TRITON_CHILD_ENV

HERE = Path(__file__).resolve().parent
# The test files whose Triton cases the child runs (keep in sync with the files using the fixture).
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
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
               f"--junitxml={xml}", *[str(HERE / f) for f in TRITON_FILES]]
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
                    outcome, message = "failed", (child.get("message", "") + "\n" + (child.text or ""))[-3000:]
                elif child.tag == "skipped":
                    outcome, message = "skipped", child.get("message", "")
            self._results[key] = outcome, message

    def report(self, node: pytest.Item) -> None:
        """Passes, fails or skips as the child's run of the same case did."""
        if self._results is None:
            self._run()
        key = (Path(node.fspath).stem, node.name)
        if key not in self._results:
            pytest.fail(f"the Triton child run has no result for {node.name}; its output:\n{self._log}")
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


@pytest.fixture(scope="session")
def triton_child(tmp_path_factory) -> TritonChild:
    if os.environ.get(TRITON_CHILD_ENV) == "1":
        raise RuntimeError("the Triton child must not start another child (interpreter inactive?)")
    return TritonChild(tmp_path_factory.mktemp("triton_child"))
