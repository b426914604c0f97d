"""Ahead-of-time compile report: ``python -m kvquant.aot --arch 80 --arch 90``.

Compiles, without a GPU, every Triton kernel specialization the engine can launch, for a
given CUDA architecture, and reports registers, spill stack and shared memory per
specialization (from ``cuobjdump --dump-resource-usage`` of the cubin, with the tools bundled
in the triton wheel).

What to compile is not listed by hand: for each problem (cache dtype, layout, head size, GQA
group, cache block size, and a few step shapes: long and short decode batches, prefill, a
prefill chunk deep into a long prompt) the run-time launch builders of
:mod:`kvquant.triton_kernels` build their launches from small CPU tensors of that shape (tile
sizes, warps, stages and KV splits come from :mod:`kvquant.launch`, as at run time), and
Triton's own argument binder derives the specialization (signature, constexprs, alignment),
as it would before a launch. Problems that compile to the same kernel share one entry.

This reaches into two Triton internals (``create_function_from_signature`` and
``JITFunction._pack_args``, checked with Triton 3.9); a Triton without them fails with a clear
error. Results are cached per (kernel source and dependencies, specialization, options,
architecture, Triton version) under ``--cache-dir``.

To add a cache layout, add an entry to :data:`LAYOUTS` (its name and the ``KVCache`` arguments
that select it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "ARCHS",
    "LAYOUTS",
    "Arch",
    "CompileJob",
    "Problem",
    "Result",
    "compile_jobs",
    "enumerate_problems",
    "main",
    "report",
    "run",
]

# One entry per cache layout the engine can hold: a name and the KVCache arguments selecting it.
LAYOUTS: dict[str, dict[str, Any]] = {
    "bits0": {"bits": 0},
    "int8": {"bits": 8},
    "int4": {"bits": 4},
    "int4-block": {"bits": 4, "int4_layout": "block-channel", "residual_slots": 1},
}
DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16)
HEAD_DIMS: tuple[int, ...] = (64, 128, 256)
GROUPS: tuple[int, ...] = (1, 4, 8)
BLOCK_SIZES: tuple[int, ...] = (16, 32, 64)
NUM_KV_HEADS = 8


@dataclass(frozen=True)
class Arch:
    name: str
    num_sms: int  # feeds the split-K heuristic, as a GPU of this kind would at run time
    shared_limit: int  # bytes of shared memory one block may use (opt-in maximum)


ARCHS: dict[int, Arch] = {
    80: Arch("A100", 108, 163 * 1024),
    86: Arch("A10/RTX 30", 84, 99 * 1024),
    89: Arch("L40S/RTX 40", 142, 99 * 1024),
    90: Arch("H100/H200", 132, 227 * 1024),
}


@dataclass(frozen=True)
class Step:
    """A batch shape the engine sends: ``batch`` sequences of ``query_len`` new tokens each,
    at ``context`` tokens in total (new ones included)."""

    name: str
    batch: int
    query_len: int
    context: int


# Together they reach decode and prefill tiles, each with and without KV splits, on every
# architecture above (a test checks it).
STEPS: tuple[Step, ...] = (
    Step("decode 1x8k", 1, 1, 8192),
    Step("decode 256x1k", 256, 1, 1024),
    Step("prefill 8x512", 8, 512, 512),
    Step("chunk 64@8k", 1, 64, 8192),
)


@dataclass(frozen=True)
class Problem:
    dtype: torch.dtype
    layout: str  # a key of LAYOUTS
    head_dim: int
    group: int
    block_size: int

    @property
    def bits(self) -> int:
        return int(LAYOUTS[self.layout]["bits"])

    def __str__(self) -> str:
        dt = str(self.dtype).removeprefix("torch.")
        return f"{dt} {self.layout} D={self.head_dim} g={self.group} bs={self.block_size}"


def enumerate_problems(
    head_dims: Sequence[int] = HEAD_DIMS, layouts: Sequence[str] = tuple(LAYOUTS)
) -> list[Problem]:
    return [
        Problem(dtype, layout, d, g, bs)
        for dtype in DTYPES
        for layout in layouts
        for d in head_dims
        for g in GROUPS
        for bs in BLOCK_SIZES
    ]


@dataclass
class CompileJob:
    """One specialization: what ``triton.compile`` needs, plus where it came from."""

    arch: int
    kernel: str  # attribute name in kvquant.triton_kernels
    specialization: str
    head_dim: int
    bits: int
    layout: str
    dtype: str
    signature: dict[str, Any]
    constexprs: dict[Any, Any]
    attrs: dict[Any, Any]
    options: dict[str, Any]
    key: str
    launched_by: list[str] = field(default_factory=list)


@dataclass
class Result:
    arch: int
    kernel: str
    specialization: str
    head_dim: int
    bits: int
    layout: str
    dtype: str
    ok: bool
    error: str | None
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    shared_limit: int
    num_warps: int
    num_stages: int
    launched_by: list[str]

    @property
    def spills(self) -> bool:
        return bool(self.spill_bytes)

    @property
    def over_shared(self) -> bool:
        return self.shared_bytes is not None and self.shared_bytes > self.shared_limit


def _kernels_module() -> Any:
    """:mod:`kvquant.triton_kernels`, compiled (not interpreted) kernels required."""
    os.environ.setdefault("TRITON_INTERPRET", "0")
    from triton.runtime.jit import JITFunction  # type: ignore[import-untyped]

    from . import triton_kernels

    if not isinstance(triton_kernels._attention_kernel, JITFunction):
        raise RuntimeError(
            "kvquant.aot compiles kernels, but kvquant.triton_kernels was imported under the "
            "Triton interpreter: run it in a process without TRITON_INTERPRET=1"
        )
    return triton_kernels


def _launches(
    tk: Any, problem: Problem, archs: Sequence[int], steps: Sequence[Step]
) -> list[tuple[int, str, Any]]:
    """``(arch, step name, launch)``: what the run-time builders launch for ``problem``,
    built from small CPU tensors of its shapes.

    Large tensors (queries of a long prefill) are allocated but never touched, so they cost
    address space, not memory.
    """
    from . import KVCache

    dev = torch.device("cpu")
    kvh, d, dtype = NUM_KV_HEADS, problem.head_dim, problem.dtype
    cache = KVCache(
        num_layers=1,
        num_blocks=4,
        block_size=problem.block_size,
        num_kv_heads=kvh,
        head_dim=d,
        dtype=dtype,
        device=dev,
        **LAYOUTS[problem.layout],
    )
    k = torch.empty(2, kvh, d, dtype=dtype)
    slots = torch.zeros(2, dtype=torch.int64)
    common: list[Any] = list(tk.write_launches(cache, 0, k, k, slots))
    if problem.bits:  # the public quantize/dequantize (not launched by the engine)
        ql, codes, sz = tk.quantize_launches(k[:, 0], problem.bits)
        dl, _ = tk.dequantize_launches(codes, sz, problem.bits, dtype)
        common += ql + dl
    out = [(arch, "any step", launch) for arch in archs for launch in common]
    for step in steps:
        t = step.batch * step.query_len
        q = torch.empty(t, kvh * problem.group, d, dtype=dtype)
        width = -(-step.context // problem.block_size)
        tables = torch.zeros(step.batch, width, dtype=torch.int32)
        lens = torch.full((step.batch,), step.context, dtype=torch.int32)
        qlens = torch.full((step.batch,), step.query_len, dtype=torch.int32)
        for arch in archs:
            att, _ = tk.attention_launches(
                q, cache, 0, tables, lens, qlens, d**-0.5, num_sms=ARCHS[arch].num_sms, arch=arch
            )
            out += [(arch, step.name, launch) for launch in att]
    return out


# Pointers whose dtypes tell specializations apart (the others are int32 metadata or scratch).
_SHOWN_POINTERS = ("x_ptr", "codes_ptr", "sz_ptr", "q_ptr", "k_ptr", "ksz_ptr", "out_ptr")


def _describe(kernel: Any, signature: dict[str, Any], constexprs: dict[Any, Any]) -> str:
    names = kernel.arg_names
    ptrs = [
        f"{n.removesuffix('_ptr')}={t.lstrip('*')}"
        for n, t in signature.items()
        if n in _SHOWN_POINTERS
    ]
    consts = []
    for path, value in sorted(constexprs.items()):
        name = names[path[0]]
        if not name.isupper():
            continue  # an integer Triton specialized to a constant (a runtime argument)
        shown = str(value).removeprefix("triton.language.") if not isinstance(value, int) else value
        consts.append(f"{name}={int(shown) if isinstance(shown, bool) else shown}")
    return " ".join(consts + ptrs)


class _Binders:
    """Triton's per-architecture backends and per-kernel argument binders, built once."""

    def __init__(self) -> None:
        self._backends: dict[int, Any] = {}
        self._binders: dict[tuple[str, int], Any] = {}

    def get(self, kernel: Any, arch: int) -> tuple[Any, Any]:
        from triton.backends.compiler import GPUTarget  # type: ignore[import-untyped]
        from triton.compiler import make_backend  # type: ignore[import-untyped]
        from triton.runtime.jit import create_function_from_signature

        if arch not in self._backends:
            self._backends[arch] = make_backend(GPUTarget("cuda", arch, 32))
        backend = self._backends[arch]
        key = (kernel.__name__, arch)
        if key not in self._binders:
            self._binders[key] = create_function_from_signature(
                kernel.signature, kernel.params, backend
            )
        return backend, self._binders[key]


def _job(binders: _Binders, launch: Any, arch: int, problem: Problem) -> CompileJob:
    """Bind ``launch``'s arguments as Triton does before launching, for ``arch``."""
    import triton  # type: ignore[import-untyped]
    from triton import knobs
    from triton.compiler import ASTSource

    kernel = launch.kernel
    # JITFunction.run adds these before binding; mirror it so options hash the same.
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    for name in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, name):
            kwargs[name] = getattr(knobs.compilation, name)
    try:
        backend, binder = binders.get(kernel, arch)
        bound, spec, opts = binder(*launch.args, **kwargs)
        options, signature, constexprs, attrs = kernel._pack_args(
            backend, kwargs, bound, spec, opts
        )
    except (AttributeError, TypeError) as e:  # pragma: no cover - depends on Triton's version
        raise RuntimeError(
            f"kvquant.aot cannot bind kernel arguments with Triton {triton.__version__} "
            f"(checked with 3.9): {e}"
        ) from e
    src = ASTSource(kernel, signature, constexprs, attrs)
    opt = options.__dict__
    key = hashlib.sha256(
        "|".join(
            [src.hash(), repr(sorted(opt.items())), str(arch), triton.__version__, "aot-v1"]
        ).encode()
    ).hexdigest()
    return CompileJob(
        arch=arch,
        kernel=kernel.__name__,
        specialization=_describe(kernel, signature, constexprs)
        + f" warps={options.num_warps} stages={options.num_stages}",
        head_dim=problem.head_dim,
        bits=problem.bits,
        layout=problem.layout,
        dtype=str(problem.dtype).removeprefix("torch."),
        signature=signature,
        constexprs=constexprs,
        attrs=attrs,
        options=opt,
        key=key,
    )


def compile_jobs(
    archs: Iterable[int],
    problems: Iterable[Problem],
    steps: Sequence[Step] = STEPS,
    kernels: Sequence[str] = (),
) -> list[CompileJob]:
    """Every distinct specialization the problems launch, per architecture.

    ``kernels`` keeps only those (short names: write, dequantize, attention, combine).
    """
    tk = _kernels_module()
    archs = list(archs)
    binders = _Binders()
    jobs: dict[str, CompileJob] = {}
    for problem in problems:
        for arch, step, launch in _launches(tk, problem, archs, steps):
            if kernels and _short(launch.kernel.__name__) not in kernels:
                continue
            job = _job(binders, launch, arch, problem)
            job = jobs.setdefault(job.key, job)
            origin = f"{problem}: {step}"
            if origin not in job.launched_by:
                job.launched_by.append(origin)
    return sorted(jobs.values(), key=lambda j: (j.arch, j.kernel, j.head_dim, j.specialization))


def _short(kernel: str) -> str:
    return kernel.strip("_").removesuffix("_kernel")


_USAGE = re.compile(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes) -> tuple[int, int, int, int]:
    """(registers, stack bytes, static shared bytes, local bytes) of a one-kernel cubin."""
    from triton import knobs

    tool = knobs.nvidia.cuobjdump.path
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        out = subprocess.run(
            [tool, "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    m = _USAGE.search(out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out!r}")
    regs, stack, shared, local = (int(x) for x in m.groups())
    return regs, stack, shared, local


def _compile(job: CompileJob) -> Result:
    """Compile one job (in a worker process) and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tk = _kernels_module()
    kernel = getattr(tk, job.kernel)
    base = dict(
        arch=job.arch,
        kernel=_short(job.kernel),
        specialization=job.specialization,
        head_dim=job.head_dim,
        bits=job.bits,
        layout=job.layout,
        dtype=job.dtype,
        shared_limit=ARCHS[job.arch].shared_limit,
        num_warps=int(job.options["num_warps"]),
        num_stages=int(job.options["num_stages"]),
        launched_by=job.launched_by,
    )
    try:
        src = ASTSource(kernel, job.signature, job.constexprs, job.attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32), options=job.options)
        regs, stack, static_shared, local = _resource_usage(compiled.asm["cubin"])
    except Exception as e:  # a failed compile is a result to report, not a crash
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        error = f"{type(e).__name__}: {' | '.join(lines[:6])}"[:2000]
        return Result(**base, ok=False, error=error, registers=None, spill_bytes=None,  # type: ignore[arg-type]
                      shared_bytes=None)
    return Result(
        **base,  # type: ignore[arg-type]
        ok=True,
        error=None,
        registers=regs,
        spill_bytes=stack + local,
        shared_bytes=int(compiled.metadata.shared) + static_shared,
    )


def _init_worker() -> None:
    os.environ["TRITON_INTERPRET"] = "0"


def run(
    jobs: Sequence[CompileJob], workers: int = 2, cache_dir: Path | None = None
) -> list[Result]:
    """Compile ``jobs`` (``workers`` processes), reusing cached results from ``cache_dir``."""
    results: dict[str, Result] = {}
    todo: list[CompileJob] = []
    for job in jobs:
        cached = _load(cache_dir, job)
        if cached is None:
            todo.append(job)
        else:
            results[job.key] = cached
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            results[job.key] = result = _compile(job)
            _store(cache_dir, job, result)
    elif todo:
        ctx = multiprocessing.get_context("spawn")  # fresh processes: compiled kernels
        with concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker
        ) as pool:
            # Stored as they finish, so an interrupted run keeps what it compiled.
            for job, result in zip(todo, pool.map(_compile, todo, chunksize=1), strict=True):
                results[job.key] = result
                _store(cache_dir, job, result)
    return [results[job.key] for job in jobs]


def _load(cache_dir: Path | None, job: CompileJob) -> Result | None:
    if cache_dir is None:
        return None
    path = cache_dir / f"{job.key}.json"
    try:
        data = json.loads(path.read_text())
        # The same kernel, maybe reached by other problems first.
        data.update(launched_by=job.launched_by, layout=job.layout)
        return Result(**data)
    except (OSError, ValueError, TypeError):
        return None


def _store(cache_dir: Path | None, job: CompileJob, result: Result) -> None:
    if cache_dir is None or not result.ok:  # a failure is retried next time
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{job.key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(asdict(result)))
    os.replace(tmp, cache_dir / f"{job.key}.json")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvquant" / "aot"


def report(results: Sequence[Result]) -> str:
    """A table (one line per specialization) and a summary line per architecture."""
    lines = [f"{'arch':<6}{'kernel':<12}{'regs':>5}{'spill':>7}{'shared':>8}  specialization"]
    for r in sorted(results, key=lambda r: (r.arch, r.kernel, r.head_dim, r.specialization)):
        if r.ok:
            flag = " SPILLS" if r.spills else ""
            flag += " OVER SHARED LIMIT" if r.over_shared else ""
            lines.append(
                f"sm_{r.arch:<3}{r.kernel:<12}{r.registers:>5}{r.spill_bytes:>7}"
                f"{r.shared_bytes:>8}  {r.specialization}{flag}"
            )
        else:
            lines.append(f"sm_{r.arch:<3}{r.kernel:<12}{'FAILED':>20}  {r.specialization}")
            lines.append(f"      {r.error}")
    for arch in sorted({r.arch for r in results}):
        mine = [r for r in results if r.arch == arch]
        lines.append(
            f"sm_{arch}: {len(mine)} specializations, "
            f"{sum(not r.ok for r in mine)} failed, "
            f"{sum(r.spills for r in mine if r.head_dim <= 128)} spill at head_dim <= 128, "
            f"{sum(r.spills for r in mine if r.head_dim > 128)} spill at head_dim > 128, "
            f"{sum(r.over_shared for r in mine)} over {ARCHS[arch].shared_limit // 1024} KB "
            "of shared memory, "
            f"max {max((r.registers or 0) for r in mine)} registers"
        )
    return "\n".join(lines)


def violations(results: Sequence[Result], shared_limit: int | None = None) -> list[str]:
    """What ``--check`` fails on: failed compiles, spills at head_dim <= 128, and shared
    memory over the architecture's limit (or ``shared_limit`` bytes when given)."""
    bad = []
    for r in results:
        limit = shared_limit if shared_limit is not None else r.shared_limit
        if not r.ok:
            bad.append(f"sm_{r.arch} {r.specialization}: {r.error}")
        elif r.head_dim <= 128 and r.spills:
            bad.append(f"sm_{r.arch} {r.specialization}: {r.spill_bytes} bytes of spill stack")
        elif r.shared_bytes is not None and r.shared_bytes > limit:
            bad.append(f"sm_{r.arch} {r.specialization}: {r.shared_bytes} bytes of shared memory")
    return bad


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kvquant.aot",
        description="Compile every Triton kernel specialization the engine can launch, "
        "without a GPU, and report registers, spills and shared memory.",
    )
    parser.add_argument("--arch", type=int, action="append", choices=sorted(ARCHS),
                        help="CUDA compute capability x10 (repeatable; default: 80 and 90)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of results")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compiler processes (default: 2)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help=f"result cache (default: {default_cache_dir()})")
    parser.add_argument("--no-cache", action="store_true", help="compile everything afresh")
    parser.add_argument("--kernel", action="append", default=[],
                        choices=["write", "dequantize", "attention", "combine"],
                        help="only these kernels (repeatable)")
    parser.add_argument("--head-dim", type=int, action="append", help="only these head sizes")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a failed compile, a spill at head_dim <= 128, or shared "
                        "memory over the architecture's limit")
    args = parser.parse_args(argv)
    os.environ["TRITON_INTERPRET"] = "0"  # this tool compiles; workers inherit the setting
    archs = args.arch or [80, 90]
    cache_dir = None if args.no_cache else (args.cache_dir or default_cache_dir())
    problems = enumerate_problems(head_dims=args.head_dim or HEAD_DIMS)
    jobs = compile_jobs(archs, problems, kernels=args.kernel)
    results = run(jobs, workers=args.jobs, cache_dir=cache_dir)
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=1))
    else:
        print(report(results))
    if args.check:
        bad = violations(results)
        for line in bad:
            print(line, file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
