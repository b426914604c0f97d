"""Hugging Face Hub ids resolve through huggingface_hub's cache, offline: the test builds a
hub-layout cache (refs/<name> -> snapshots/<commit>/) from tiny random models."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from paged_engine import EngineConfig, LLMEngine, SamplingParams

SCRIPT = """
import json, sys
from paged_engine import EngineConfig, LLMEngine, SamplingParams
from paged_engine.model_loader import resolve_model

out = {"main": str(resolve_model("acme/tiny").weights_dir),
       "v1": str(resolve_model("acme/tiny", revision="v1").weights_dir)}
engine = LLMEngine(EngineConfig(model="acme/tiny", device="cpu", num_blocks=32))
greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
out["tokens"] = engine.generate([[1, 2, 3]], greedy, use_tqdm=False)[0].token_ids
for spec, rev in (("acme/missing", None), ("acme/tiny", "v2")):
    try:
        resolve_model(spec, revision=rev)
    except FileNotFoundError as exc:
        out[spec + (rev or "")] = str(exc)
print(json.dumps(out))
"""


def _snapshot(cache: Path, commit: str, ref: str, model_dir: Path) -> Path:
    repo = cache / "hub" / "models--acme--tiny"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    snap = repo / "snapshots" / commit
    shutil.copytree(model_dir, snap)
    return snap


def test_hub_id_resolves_from_the_cache_offline(
    tiny_model: Callable[[str], tuple[Path, Any]], tmp_path: Path
) -> None:
    main_dir, _ = tiny_model("llama")
    other_dir, _ = tiny_model("mistral")
    home = tmp_path / "hf-home"
    main_snap = _snapshot(home, "a" * 40, "main", main_dir)
    v1_snap = _snapshot(home, "b" * 40, "v1", other_dir)
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (out["main"], out["v1"]) == (str(main_snap), str(v1_snap))
    direct = LLMEngine(EngineConfig(model=str(main_dir), device="cpu", num_blocks=32))
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    assert out["tokens"] == direct.generate([[1, 2, 3]], greedy, use_tqdm=False)[0].token_ids
    for key in ("acme/missing", "acme/tinyv2"):
        message = out[key]
        assert str(home / "hub") in message and "hf download acme/" in message, message
    assert "--revision v2" in out["acme/tinyv2"]


def test_revision_needs_a_hub_id(tiny_model: Callable[[str], tuple[Path, Any]]) -> None:
    with pytest.raises(ValueError, match="revision"):
        LLMEngine(EngineConfig(model=str(tiny_model("llama")[0]), revision="main", device="cpu"))
    with pytest.raises(ValueError, match="revision"):
        EngineConfig(revision="")
