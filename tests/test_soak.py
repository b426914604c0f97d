"""The soak harness at CI size: 45 seconds of bench traffic and hostile clients against a real
server, then SIGTERM. Latency ratios are the full run's business (a shared CI machine is too
noisy for them); crashes, server errors, leaked blocks, memory growth and a clean exit are
checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SOAK = Path(__file__).resolve().parents[1] / "benchmarks" / "soak.py"


def test_one_minute_soak(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--minutes", "0.75", "--idle-probes", "10", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["crashes"] == 0, report
    assert report["server_errors"] == 0, report["server_error_samples"]
    assert report["leaked_blocks"] == 0, report
    assert report["sigterm_exit_status"] == 0, report
    assert report["rss_growth_pct"] < 10, report
    assert report["bench_ok"] > 0 and report["bench_failed"] == 0, report
    assert set(report["probes"]) == {"benign", "hostile", "mixed"}, report
    # the hostile client's bad requests were refused, its max-size stop lists served
    statuses = report["statuses"]
    assert statuses.get("bad 400", 0) > 0 and statuses.get("max-stops 200", 0) > 0, statuses
