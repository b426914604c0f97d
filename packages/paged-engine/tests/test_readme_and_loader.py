"""The README's example runs; GGUF conversion is cached, atomic and locked."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest

from paged_engine import model_loader

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "EngineStats(" in out and "r1 length 4" in out


def _fake_gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF not really")
    return path


def test_conversion_is_cached_and_locked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGED_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    calls: list[Path] = []

    def fake_write(gguf: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir(parents=True)
        time.sleep(0.2)  # a slow conversion: the other thread must wait, not convert again
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_loader, "_write_converted", fake_write)
    gguf = _fake_gguf(tmp_path)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(model_loader.convert_gguf(gguf)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results[0] == results[1]
    assert results[0].parent == tmp_path / "cache" / "converted"
    assert (results[0] / "config.json").is_file()
    assert model_loader.convert_gguf(gguf) == results[0] and len(calls) == 1
    # Only the finished directory (and its lock) remain: no temporary leftovers.
    names = sorted(p.name for p in results[0].parent.iterdir())
    assert names == [results[0].name, results[0].name + ".lock"]


def test_failed_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGED_ENGINE_CACHE_DIR", str(tmp_path / "cache"))

    def broken_write(gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_loader, "_write_converted", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        model_loader.convert_gguf(_fake_gguf(tmp_path))
    leftovers = [p.name for p in (tmp_path / "cache" / "converted").iterdir()]
    assert all(name.endswith(".lock") for name in leftovers)


def test_a_killed_conversion_is_cleaned_up_on_the_next_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SIGKILL mid-conversion leaves its temporary folder; the next conversion removes it
    (and those of other models whose process is gone), but never a live process's."""
    import os
    import subprocess
    import sys

    monkeypatch.setenv("PAGED_ENGINE_CACHE_DIR", str(tmp_path / "cache"))
    gguf = _fake_gguf(tmp_path)
    converted = tmp_path / "cache" / "converted"
    converted.mkdir(parents=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)

    calls: list[Path] = []

    def fake_write(gguf_path: Path, out: Path) -> None:
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(model_loader, "_write_converted", fake_write)
    target_name = model_loader.convert_gguf(gguf).name
    # Simulate the leftovers of killed runs: this model's, another model's (dead process),
    # and a live process's conversion of another model, which must stay.
    import shutil

    shutil.rmtree(converted / target_name)
    own = converted / f".{target_name}.tmp-{dead_pid}-deadbeef"
    other = converted / f".other-1234.tmp-{dead_pid}-cafebabe"
    live = converted / f".other-5678.tmp-{os.getpid()}-0badf00d"
    for d in (own, other, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    assert model_loader.convert_gguf(gguf).name == target_name
    assert len(calls) == 2
    assert not own.exists() and not other.exists()
    assert live.is_dir()
