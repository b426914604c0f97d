"""`llm-serve chat` with the bundled model keeps the conversation across turns, and `/reset`
forgets it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def _command() -> list[str]:
    script = Path(sys.executable).parent / "llm-serve"
    if script.is_file():
        return [str(script)]  # the console script `uv run llm-serve` runs
    return [sys.executable, "-m", "llm_serve.cli"]


def test_chat_remembers_the_conversation_until_reset() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    lines = "What is the capital of France?\nAnd of Italy?\n/reset\n/exit\n"
    proc = subprocess.run(
        [*_command(), "chat", "--temperature", "0", "--max-tokens", "24", "--device", "cpu"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    turns = proc.stdout.split(">>> ")
    # banner, France, Italy, reset, exit
    assert len(turns) == 5, proc.stdout
    assert "Paris" in turns[1], proc.stdout
    assert "Rome" in turns[2], proc.stdout  # "And of Italy?" only makes sense with the history
    assert "(conversation cleared)" in turns[3]
