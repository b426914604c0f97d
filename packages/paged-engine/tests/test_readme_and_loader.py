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
