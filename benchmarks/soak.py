"""Soak: N minutes of ordinary and hostile traffic against a real `llm-serve serve` process.

While `llm-serve bench` rounds (the project's load generator, in-process) keep the server busy,
a hostile client keeps sending what once hurt it: streams cut mid-way, requests aborted by a
short client timeout, malformed and out-of-range bodies, maximum-size stop lists (16 strings
of 256 characters, the most the server accepts), silent sockets and half-sent bodies. A probe
sends one small request at a time throughout. At the end the server gets SIGTERM.

Reported (and checked against the targets):
- crashes: the server process exited before the SIGTERM, or /health stopped answering 200;
- 5xx: answers with a server-error status to any of the clients above (bench included);
- leaked blocks: KV blocks still used once the traffic stopped (must return to 0);
- RSS growth: the server's resident memory at the end against after warm-up (< 5%);
- probe p99 while the hostile client runs alone against idle (<= 2x): the latency a
  well-behaved client sees while another sends max-size stop lists. The run has three
  phases: an ordinary peer sending the hostile client's requests without their stop lists
  (the control: any concurrent request slows a probe on a CPU), the hostile client alone,
  then everything with the bench traffic; the probe p99 of each is reported;
- SIGTERM: the server drains and exits with status 0.

Everything listens on 127.0.0.1 and every loop is bounded in time and count.

    uv run python benchmarks/soak.py --minutes 10          # the full run (RESULTS.md)
    uv run python benchmarks/soak.py --minutes 1           # CI size
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import hardware, markdown_table, save_json  # noqa: E402

from llm_serve.bench import BenchConfig, BenchError, run_bench  # noqa: E402
from llm_serve.limits import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS  # noqa: E402

TINY = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 4096,
}
PROBE = {"model": "soak", "prompt": "probe: how fast now?", "max_tokens": 8, "temperature": 0}


@dataclass
class Tally:
    """Counters shared by the traffic threads (guarded by ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: list[str] = field(default_factory=list)
    phase: str = "benign"
    probes: dict[str, list[float]] = field(default_factory=dict)
    bench_rounds: int = 0
    bench_ok: int = 0
    bench_failed: int = 0

    def status(self, kind: str, code: int, detail: str = "") -> None:
        with self.lock:
            key = f"{kind} {code}"
            self.statuses[key] = self.statuses.get(key, 0) + 1
            if code >= 500:
                self.server_errors.append(f"{kind} {code} {detail[:200]}")


class Server:
    """`llm-serve serve` in a child process on a free port of 127.0.0.1."""

    def __init__(self, model: str, extra: list[str], log: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "llm_serve.cli", "serve", model, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--served-model-name", "soak", *extra]
        self._log = open(log, "wb")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy within {timeout} s; see {self.log}")

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/v1/cache/stats", timeout=30).json()
        return data

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self._log.close()


def probe_once(url: str) -> float:
    t0 = time.perf_counter()
    r = httpx.post(f"{url}/v1/completions", json=PROBE, timeout=60)
    if r.status_code != 200:
        raise RuntimeError(f"probe got {r.status_code}: {r.text[:200]}")
    return time.perf_counter() - t0


def p99(values: list[float]) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


# -- traffic ---------------------------------------------------------------------------------------


def bench_loop(url: str, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Rounds of `llm-serve bench` (streaming, shared prefixes) until ``stop``."""
    round_no = 0
    while not stop.is_set():
        config = BenchConfig(
            url=url,
            model="soak",
            num_prefixes=4,
            prefix_len=48,
            suffix_len=8,
            output_len=16,
            num_requests=16,
            max_concurrency=8,
            seed=seed + round_no,
            ignore_eos=True,
            timeout=120,
            progress=False,
        )
        round_no += 1
        try:
            with open(os.devnull, "w") as quiet:
                _, _, results = run_bench(config, quiet)
        except BenchError as exc:
            tally.status("bench", 599, str(exc))
            continue
        with tally.lock:
            tally.bench_rounds += 1
            for res in results:
                if res.ok:
                    tally.bench_ok += 1
                else:
                    tally.bench_failed += 1
                    if res.error and any(f" {c}" in res.error for c in ("500", "502", "503")):
                        tally.server_errors.append(f"bench: {res.error[:200]}")


def _bad_bodies(rng: random.Random) -> list[bytes]:
    base = {"model": "soak", "prompt": "x", "max_tokens": 4}
    bad: list[Any] = [
        {**base, "top_k": 2**63},
        {**base, "seed": 2**64},
        {**base, "seed": 2**63 - 1, "n": 3},
        {**base, "stop": [""]},
        {**base, "stop": ["s"] * (MAX_STOP_STRINGS + 1)},
        {**base, "n": 10_000},
        {**base, "max_tokens": 10**9},
        {**base, "stream_options": {"include_usage": True}},
        {**base, "prompt": [[1, 2], [3, "x"]]},
        {"model": "soak", "messages": [{"role": "wizard", "content": "hi"}]},
        {"model": "soak", "messages": []},
    ]
    raw = [json.dumps(b).encode() for b in bad]
    raw += [b'{"model": "soak", "prompt": "\\ud800"}', b"{nope", b"[1, 2]", b""]
    raw.append(b'{"model": "soak", "prompt": "x", "temperature": Infinity}')
    rng.shuffle(raw)
    return raw


def _max_stops_body(rng: random.Random) -> dict[str, Any]:
    stop = "".join(rng.choice("abcdefghij") for _ in range(MAX_STOP_STRING_CHARS))
    return {
        "model": "soak",
        "prompt": "the hostile client's stop list",
        "max_tokens": 48,
        "ignore_eos": True,
        "temperature": 1.0,
        "stop": [stop[i:] + stop[:i] for i in range(MAX_STOP_STRINGS)],
    }


def peer_loop(url: str, stop: threading.Event, tally: Tally) -> None:
    """The control: the hostile client's stop-list request without its stop list, back to back
    (the probe's latency next to an ordinary peer)."""
    body = {k: v for k, v in _max_stops_body(random.Random(0)).items() if k != "stop"}
    while not stop.is_set():
        try:
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
            tally.status("peer", r.status_code, r.text)
        except httpx.HTTPError as exc:
            tally.status("peer-transport", 0, str(exc))


def hostile_loop(url: str, port: int, stop: threading.Event, tally: Tally, seed: int) -> None:
    """Cut streams, aborted requests, bad bodies, max-size stop lists, silent sockets."""
    rng = random.Random(seed)
    max_stops = _max_stops_body(rng)

    def cut_stream() -> None:
        body = {**max_stops, "stream": True, "max_tokens": 64}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
            tally.status("cut-stream", r.status_code)
            for i, _ in enumerate(r.iter_lines()):
                if i >= rng.randint(1, 6):
                    break  # leaving the block drops the connection mid-stream

    def aborted() -> None:
        body = {**max_stops, "max_tokens": 64}
        with contextlib.suppress(httpx.TimeoutException):
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=rng.uniform(0.05, 0.3))
            tally.status("aborted", r.status_code)

    def bad() -> None:
        body = rng.choice(_bad_bodies(rng))
        path = "chat/completions" if b"messages" in body else "completions"
        r = httpx.post(
            f"{url}/v1/{path}",
            content=body,
            headers={"content-type": "application/json"},
            timeout=30,
        )
        tally.status("bad", r.status_code, r.text)

    def stop_list() -> None:
        r = httpx.post(f"{url}/v1/completions", json=max_stops, timeout=60)
        tally.status("max-stops", r.status_code, r.text)

    def slow_socket() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            if rng.random() < 0.5:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                    b'Content-Type: application/json\r\nContent-Length: 400\r\n\r\n{"mo'
                )
            time.sleep(rng.uniform(0.05, 0.5))

    actions: list[Callable[[], None]] = [cut_stream, aborted, bad, bad, stop_list, slow_socket]
    while not stop.is_set():
        action = rng.choice(actions)
        try:
            action()
        except httpx.HTTPError as exc:
            tally.status(f"{action.__name__}-transport", 0, str(exc))


def probe_loop(url: str, stop: threading.Event, tally: Tally) -> None:
    while not stop.is_set():
        try:
            latency = probe_once(url)
        except (httpx.HTTPError, RuntimeError) as exc:
            tally.status("probe", 599, str(exc))
        else:
            with tally.lock:
                tally.probes.setdefault(tally.phase, []).append(latency)
        stop.wait(0.25)


# -- the run ---------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="llm-serve-soak-"))
    model = args.model
    if model is None:
        (workdir / "config.json").write_text(json.dumps(TINY))
        model = f"dummy:{workdir / 'config.json'}"
    extra = ["--device", "cpu", "--num-blocks", str(args.num_blocks), "--max-model-len", "512"]
    extra += ["--log-level", "warning", "--shutdown-timeout", "10", "--header-timeout", "2"]
    extra += ["--body-timeout", "5"]
    server = Server(model, extra, workdir / "server.log")
    try:
        server.wait_healthy(300)
        for _ in range(5):  # warm-up
            probe_once(server.url)
        idle = [probe_once(server.url) for _ in range(args.idle_probes)]
        rss_start = server.rss_bytes()
        stop = threading.Event()
        tally = Tally()
        # Phase 1: the hostile client alone, against the probe (the p99 target). Phase 2: the
        # bench traffic joins (everything at once, for crashes, errors, leaks and memory).
        peer_stop = threading.Event()
        threads = {
            "benign": threading.Thread(
                target=peer_loop, args=(server.url, peer_stop, tally), daemon=True
            ),
            "hostile": threading.Thread(
                target=hostile_loop, args=(server.url, server.port, stop, tally, 2), daemon=True
            ),
            "mixed": threading.Thread(
                target=bench_loop, args=(server.url, stop, tally, 1), daemon=True
            ),
        }
        probe = threading.Thread(target=probe_loop, args=(server.url, stop, tally), daemon=True)
        t0 = time.monotonic()
        window = 60 * args.minutes * args.hostile_only / 2
        starts = {"benign": t0, "hostile": t0 + window, "mixed": t0 + 2 * window}
        threads["benign"].start()
        probe.start()
        health_failures = 0
        deadline = t0 + 60 * args.minutes
        while time.monotonic() < deadline and server.proc.poll() is None:
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
            for phase in ("hostile", "mixed"):
                if not threads[phase].is_alive() and time.monotonic() >= starts[phase]:
                    if phase == "hostile":
                        peer_stop.set()
                    with tally.lock:
                        tally.phase = phase
                    if threads[phase].ident is None:
                        threads[phase].start()
            try:
                if httpx.get(f"{server.url}/health", timeout=10).status_code != 200:
                    health_failures += 1
            except httpx.HTTPError:
                health_failures += 1
        stop.set()
        peer_stop.set()
        for t in [*threads.values(), probe]:
            if t.is_alive():
                t.join(180)
        crashed = server.proc.poll() is not None
        leaked = -1
        stats: dict[str, Any] = {}
        if not crashed:
            settle = time.monotonic() + 60
            while True:
                stats = server.stats()
                idle_now = not (stats["num_running"] or stats["num_waiting"])
                if (idle_now and stats["num_blocks_used"] == 0) or time.monotonic() > settle:
                    break
                time.sleep(0.25)
            leaked = int(stats["num_blocks_used"])
        rss_end = server.rss_bytes() if not crashed else 0
        sigterm_status: int | None = None
        if not crashed:
            server.proc.send_signal(signal.SIGTERM)
            try:
                sigterm_status = server.proc.wait(60)
            except subprocess.TimeoutExpired:
                sigterm_status = None
        elapsed = time.monotonic() - t0
    finally:
        server.close()
    idle_p99 = p99(idle)
    benign_p99 = p99(tally.probes.get("benign", []))
    load_p99 = p99(tally.probes.get("hostile", []))
    mixed_p99 = p99(tally.probes.get("mixed", []))
    return {
        "minutes": args.minutes,
        "elapsed_s": round(elapsed, 1),
        "model": args.model or "dummy (tiny)",
        "hardware": hardware(),
        "crashes": int(crashed) + health_failures,
        "server_errors": len(tally.server_errors),
        "server_error_samples": tally.server_errors[:10],
        "leaked_blocks": leaked,
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_growth_pct": round(100.0 * (rss_end - rss_start) / rss_start, 2) if rss_end else None,
        "probe_idle_p99_s": round(idle_p99, 4),
        "probe_hostile_p99_s": round(load_p99, 4),
        "probe_p99_ratio": round(load_p99 / idle_p99, 2) if idle_p99 else None,
        "probe_hostile_median_s": round(statistics.median(tally.probes["hostile"]), 4)
        if tally.probes.get("hostile")
        else None,
        "probe_benign_peer_p99_s": round(benign_p99, 4),
        "probe_mixed_p99_s": round(mixed_p99, 4),
        "probes": {phase: len(v) for phase, v in tally.probes.items()},
        "bench_rounds": tally.bench_rounds,
        "bench_ok": tally.bench_ok,
        "bench_failed": tally.bench_failed,
        "statuses": dict(sorted(tally.statuses.items())),
        "sigterm_exit_status": sigterm_status,
    }


def verdicts(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target of the soak."""
    growth = report["rss_growth_pct"]
    ratio = report["probe_p99_ratio"]
    return [
        ("0 crashes", str(report["crashes"]), report["crashes"] == 0),
        ("0 server errors (5xx)", str(report["server_errors"]), report["server_errors"] == 0),
        ("0 leaked blocks", str(report["leaked_blocks"]), report["leaked_blocks"] == 0),
        ("RSS growth < 5%", f"{growth}%", growth is not None and growth < 5.0),
        ("probe p99 <= 2x idle", f"{ratio}x", ratio is not None and ratio <= 2.0),
        ("SIGTERM exits 0", str(report["sigterm_exit_status"]), report["sigterm_exit_status"] == 0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic time [10]")
    parser.add_argument(
        "--model", default=None, help="model spec to serve [a tiny random dummy model]"
    )
    parser.add_argument("--num-blocks", type=int, default=1024, help="KV blocks [1024]")
    parser.add_argument("--idle-probes", type=int, default=40, help="probes before load [40]")
    parser.add_argument(
        "--hostile-only",
        type=float,
        default=0.4,
        help="share of the time before the bench traffic joins: its first half an ordinary "
        "peer runs next to the probe (the control), its second half the hostile client alone "
        "(the probe p99 target is measured then) [0.4]",
    )
    parser.add_argument(
        "--json", default=None, help="also write the report here [benchmarks/results/soak.json]"
    )
    args = parser.parse_args(argv)
    if not args.minutes > 0:
        parser.error("--minutes must be > 0")
    report = run(args)
    rows = verdicts(report)
    print(
        markdown_table(
            ["target", "measured", "met"], [(t, m, "yes" if ok else "NO") for t, m, ok in rows]
        )
    )
    print(json.dumps({k: v for k, v in report.items() if k != "statuses"}, indent=2))
    print("statuses:", json.dumps(report["statuses"]))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    else:
        print(f"wrote {save_json('soak', report)}")
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
