"""benchmarks/gpu_check.sh, rehearsed on the CPU (GPU_CHECK_CPU=1): every stage runs, none fails,
and the outer-step table holds measured peaks next to the planner's estimates. About 100 s on one
core."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("build", "info", "ops", "attention", "outer step", "planner")


def _table_rows(out: str) -> list[list[str]]:
    """Cells of the outer-step tables' recipe rows (header and rule lines left out)."""
    rows = []
    for line in out.splitlines():
        if re.match(r"\| (reference|lean-\S+) \|", line):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def _number(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def test_gpu_check_cpu_rehearsal(tmp_path):
    env = dict(
        os.environ, GPU_CHECK_CPU="1", PYTHON=sys.executable, OUT=str(tmp_path), OMP_NUM_THREADS="1"
    )
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    for stage in STAGES:
        assert re.search(rf"^== {stage}: ", out, re.M), f"no header for stage {stage!r}"
        if stage != "build":
            assert re.search(rf"^== {stage} done in \d+ s$", out, re.M), (
                f"stage {stage!r} did not finish"
            )
    assert "FAILED" not in out, out[-6000:]
    assert "== all stages passed" in out
    assert (tmp_path / "gpu_check.log").read_text().strip().endswith("== all stages passed")

    # the outer step: reference and a lean recipe, each with a measured peak and the planner's
    # estimate
    rows = _table_rows(out)
    head = next(line for line in out.splitlines() if line.startswith("| recipe | peak MiB |"))
    cols = [c.strip() for c in head.strip().strip("|").split("|")]
    peak, plan, ratio = (
        cols.index("peak MiB"),
        cols.index("planner MiB"),
        cols.index("planner / measured"),
    )
    measured = {}
    for r in rows:
        assert len(r) == len(cols), r
        if _number(r[peak]) is not None:
            measured.setdefault(r[0], []).append(r)
            assert _number(r[plan]) is not None and _number(r[plan]) > 0, (
                f"no planner estimate: {r}"
            )
            assert 0.5 < _number(r[ratio]) < 2, f"planner far from the measurement: {r}"
    assert "reference" in measured
    assert any(name.startswith("lean-") for name in measured), rows
    assert len(measured["reference"]) == 2  # the LoRA and the full-parameter configuration
