"""The README's Python quick start runs as written, and its flag tables cover every flag."""

from __future__ import annotations

import re
from pathlib import Path

from llm_serve import cli

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_python_quick_start_runs(capsys: object) -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quick start: Python", 1)[1].split("\n## ", 1)[0]
    (block,) = _python_blocks(section)
    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})


def test_structured_output_example_runs() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Structured output and tool calling", 1)[1].split("\n## ", 1)[0]
    block = _python_blocks(section)[0]  # the second one needs a running server
    exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})


def test_every_flag_is_documented() -> None:
    text = README.read_text(encoding="utf-8")
    commands = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert set(commands) == {"serve", "chat", "bench"}
    for name, parser in commands.items():
        assert f"## `llm-serve {name}" in text, name
        flags = {s for a in parser._actions for s in a.option_strings if s.startswith("--")}
        flags -= {"--help"}
        missing = sorted(f for f in flags if f"`{f}`" not in text and f"`{f} " not in text)
        assert not missing, f"{name} flags missing from the README: {missing}"
