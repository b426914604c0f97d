"""``llm-serve chat``: the conversation logic in process, and the command in a pseudo-terminal."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from llm_serve import EngineConfig, GenerationConfig, pipeline
from llm_serve.chat import PROMPT, ChatSession, run_chat


@pytest.fixture(scope="module")
def pipe(tiny_model: str) -> Iterator[object]:
    with pipeline(
        tiny_model, backend_config=EngineConfig(device="cpu", num_blocks=256, max_model_len=256)
    ) as p:
        yield p


def _session(pipe: object, **kw: object) -> ChatSession:
    # Sampled (seeded): a random model's greedy bytes are rarely valid UTF-8, so its text would
    # be held back to the end; sampled bytes are often ASCII and come out as they are made.
    gen = GenerationConfig(max_tokens=12, temperature=1.0, seed=0, ignore_eos=True)
    return ChatSession(pipe, gen, **kw)  # type: ignore[arg-type]


def test_replies_stream_and_history_carries_over(pipe: object) -> None:
    session = _session(pipe, system="be brief")
    pieces: list[str] = []
    first = session.reply("Hello there", pieces.append)
    assert first and "".join(pieces) == first
    assert len(pieces) > 1  # streamed piece by piece, not written once at the end
    assert [m["role"] for m in session.history] == ["system", "user", "assistant"]
    assert session.history[-1]["content"] == first
    session.reply("And then?", lambda _text: None)
    assert [m["role"] for m in session.history][-2:] == ["user", "assistant"]
    assert session.last_cached_tokens >= 16  # the first turn's blocks came from the cache
    session.reset()
    assert session.history == [{"role": "system", "content": "be brief"}]


def test_old_turns_are_dropped_when_the_context_is_full(pipe: object) -> None:
    session = _session(pipe)
    for i in range(6):
        session.reply(f"turn {i} " + "x" * 60, lambda _text: None)
    assert session.history[0]["content"].startswith("turn ") and len(session.history) < 12
    assert session.history[-2]["content"].startswith("turn 5")
    with pytest.raises(ValueError, match="too long"):
        session.reply("y" * 400, lambda _text: None)
    assert session.history[-1]["role"] == "assistant"  # the refused message was not kept


def test_run_chat_commands(pipe: object) -> None:
    session = _session(pipe)
    lines = iter(["hi", "", "/reset", "/help", "again", "/exit", "never read"])
    shown: list[str] = []
    prompts: list[str] = []

    def read(prompt: str) -> str:
        prompts.append(prompt)
        return next(lines)

    assert run_chat(session, read, shown.append) == 0
    out = "".join(shown)
    assert "(conversation cleared)" in out and "/reset" in out
    assert prompts == [PROMPT] * 6
    assert [m["content"] for m in session.history if m["role"] == "user"] == ["again"]

    def eof(prompt: str) -> str:
        raise EOFError

    assert run_chat(session, eof, shown.append) == 0


def _read_until(fd: int, marker: bytes, buf: bytearray, timeout: float = 60.0) -> bytes:
    """Read from ``fd`` into ``buf`` until ``marker`` appears; return and consume up to it."""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {marker!r} within {timeout} s; got {bytes(buf)!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {marker!r}; got {bytes(buf)!r}")
            buf.extend(chunk)
    end = buf.index(marker) + len(marker)
    head = bytes(buf[:end])
    del buf[:end]
    return head


def test_chat_command_in_a_terminal(tiny_model: str) -> None:
    master, slave = pty.openpty()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TERM": "dumb"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llm_serve.cli",
            "chat",
            tiny_model,
            "--device",
            "cpu",
            "--num-blocks",
            "128",
            "--max-tokens",
            "12",
            "--temperature",
            "0",
        ],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=env,
        close_fds=True,
    )
    os.close(slave)
    buf = bytearray()
    try:
        banner = _read_until(master, PROMPT.encode(), buf)
        assert b"/reset" in banner
        os.write(master, b"Hello there\n")
        turn = _read_until(master, PROMPT.encode(), buf)
        reply = turn.split(b"Hello there", 1)[1][: -len(PROMPT)].strip()
        assert reply, turn  # the model answered before the next prompt
        os.write(master, b"/reset\n")
        assert b"(conversation cleared)" in _read_until(master, PROMPT.encode(), buf)
        os.write(master, b"Hi again\n")
        _read_until(master, PROMPT.encode(), buf)
        os.write(master, b"/exit\n")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        os.close(master)
