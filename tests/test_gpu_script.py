"""The one-shot GPU script is checked on the CPU: bash syntax, its --dry-run listing (which
writes nothing), its argument check, and the Python helpers it calls compile."""

from __future__ import annotations

import os
import py_compile
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu" / "run.sh"
STEPS = ["env", "kernel-check", "pytest-matrix", "decode-bench", "engine-bench"]


def test_syntax() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_dry_run_lists_every_step_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": "python-that-does-not-exist"}
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", "--quick"], env=env, capture_output=True, text=True,
        check=True, timeout=30,
    )
    lines = proc.stdout.splitlines()
    assert f"under {out}" in lines[0]
    listed = [ln.split()[0] for ln in lines[1:]]
    assert listed == STEPS
    limits = [int(m) for m in re.findall(r"limit +(\d+)s", proc.stdout)]
    assert len(limits) == len(STEPS) and sum(limits) < 8 * 60
    assert not out.exists()
    helpers = set(re.findall(r"benchmarks/gpu/(\w+\.py)", proc.stdout))
    assert helpers == {"env_report.py", "kernel_check.py", "decode_bench.py", "engine_bench.py"}
    for name in helpers:
        py_compile.compile(str(SCRIPT.parent / name), doraise=True)
    assert all("--quick" in ln for ln in lines if "bench.py" in ln or "check.py" in ln)


def test_bad_argument_is_refused() -> None:
    proc = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown argument" in proc.stderr
