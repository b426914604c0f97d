"""Ahead-of-time compilation: every kernel specialization the engine can launch compiles for
sm_80 and sm_90, nothing spills at head_dim <= 128, and shared memory fits sm_80's 163 KB.

Runs ``python -m kvquant.aot`` in a fresh process (these tests import the kernels under the
Triton interpreter; the compiler needs them compiled), on two compiler processes, with results
cached under pytest's cache directory (and Triton's own cache): a cold run compiles about 340
kernels (several minutes), a warm one takes seconds. Marked slow; CI runs it on its
own (.ci/run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import defaultdict
from typing import Any

import pytest

from kvquant import aot

SM80_SHARED = 163 * 1024


def _compiler_available() -> bool:
    try:
        from triton import knobs  # type: ignore[import-untyped]

        return os.path.isfile(knobs.nvidia.cuobjdump.path)
    except Exception:
        return False


needs_compiler = pytest.mark.skipif(
    not _compiler_available(), reason="this triton has no CUDA backend tools (ptxas, cuobjdump)"
)


@pytest.fixture(scope="module")
def report(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    cache = request.config.cache
    assert cache is not None
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "kvquant.aot", "--arch", "80", "--arch", "90", "--json",
         "--jobs", "2", "--cache-dir", str(cache.mkdir("kvquant-aot"))],
        capture_output=True, text=True, env=env, timeout=2400, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results: list[dict[str, Any]] = json.loads(proc.stdout)
    return results


@pytest.mark.slow
@pytest.mark.timeout(2400)  # a cold run compiles a few hundred kernels
@needs_compiler
def test_every_specialization_compiles_without_spills(report: list[dict[str, Any]]) -> None:
    fields = {"arch", "kernel", "specialization", "head_dim", "ok", "error", "registers",
              "spill_bytes", "shared_bytes", "num_warps"}
    assert report and all(fields <= set(r) for r in report)
    assert {r["arch"] for r in report} == {80, 90}
    failed = [f"sm_{r['arch']} {r['specialization']}: {r['error']}" for r in report if not r["ok"]]
    assert not failed, "\n".join(failed)
    spills = [
        f"sm_{r['arch']} {r['kernel']} {r['specialization']}: {r['spill_bytes']} B, "
        f"{r['registers']} registers"
        for r in report
        if r["head_dim"] <= 128 and r["spill_bytes"]
    ]
    assert not spills, "\n".join(spills)
    over = [r["specialization"] for r in report if r["shared_bytes"] > SM80_SHARED]
    assert not over, over
    assert all(0 < r["registers"] <= 255 for r in report)


@pytest.mark.slow
@pytest.mark.timeout(2400)
@needs_compiler
def test_report_covers_every_launch_variant(report: list[dict[str, Any]]) -> None:
    """Each (arch, dtype, layout, head_dim) has decode and prefill tiles, each with and without
    KV splits, the combine step, and the write kernel: the step shapes reach every variant."""
    seen: dict[tuple[Any, ...], set[str]] = defaultdict(set)
    reached = set()
    for r in report:
        spec = dict(kv.split("=", 1) for kv in r["specialization"].split())
        variant = r["kernel"]
        if variant == "attention":
            variant = f"rows{spec['ROWS']}-split{spec['SPLIT']}"
        for origin in r["launched_by"]:  # "<dtype> <layout> D=<d> g=<g> bs=<bs>: <step>"
            problem = origin.split(": ")[0]
            reached.add(problem)
            dtype, layout, dim = problem.split()[:3]
            seen[(r["arch"], dtype, layout, int(dim.removeprefix("D=")))].add(variant)
    want = {f"rows{rows}-split{s}" for rows in (16, 64) for s in (0, 1)} | {"write", "combine"}
    for arch in (80, 90):
        for dtype in ("float16", "bfloat16"):
            for layout, kwargs in aot.LAYOUTS.items():
                for d in aot.HEAD_DIMS:
                    missing = want - seen[(arch, dtype, layout, d)]
                    assert not missing, (arch, dtype, layout, d, missing)
                    if kwargs["bits"]:
                        assert "dequantize" in seen[(arch, dtype, layout, d)]
    assert reached == {str(p) for p in aot.enumerate_problems()}


def test_violations_flag_what_the_check_forbids() -> None:
    def result(**kw: Any) -> aot.Result:
        base: dict[str, Any] = dict(
            arch=90, kernel="attention", specialization="s", head_dim=128, bits=8,
            layout="int8", dtype="float16", ok=True, error=None, registers=128, spill_bytes=0,
            shared_bytes=1000, shared_limit=SM80_SHARED, num_warps=4, num_stages=2,
            launched_by=[],
        )
        return aot.Result(**{**base, **kw})

    assert aot.violations([result(), result(head_dim=256, spill_bytes=64)]) == []
    assert len(aot.violations([result(spill_bytes=8)])) == 1
    assert len(aot.violations([result(ok=False, error="boom", registers=None)])) == 1
    assert len(aot.violations([result(shared_bytes=SM80_SHARED + 1)])) == 1
    text = aot.report([result(), result(arch=80, spill_bytes=8)])
    assert "SPILLS" in text and "sm_80: 1 specializations, 0 failed, 1 spill" in text


def test_refuses_interpreted_kernels() -> None:
    """In a process whose kernels are interpreted there is nothing to compile: a clear error."""
    from kvquant import triton_kernels  # noqa: F401  (imported under TRITON_INTERPRET=1 here)

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("kernels are compiled in this run")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        aot.compile_jobs([90], aot.enumerate_problems()[:1])
