"""The README's quick start: `llm-serve serve` with the bundled model answers a chat request
from the official openai client on 127.0.0.1, then shuts down cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command() -> list[str]:
    script = Path(sys.executable).parent / "llm-serve"
    if script.is_file():
        return [str(script)]  # the console script `uv run llm-serve` runs
    return [sys.executable, "-m", "llm_serve.cli"]


def test_quick_start_serves_the_bundled_model() -> None:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [*_command(), "serve", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )

        def output() -> str:
            log.seek(0)
            return log.read().decode(errors="replace")[-6000:]

        try:
            deadline = time.monotonic() + 240
            while True:
                assert proc.poll() is None, f"server exited with {proc.returncode}:\n{output()}"
                assert time.monotonic() < deadline, f"not healthy in time:\n{output()}"
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)

            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            assert [m.id for m in client.models.list().data] == ["default"]
            reply = client.chat.completions.create(
                model="default",
                messages=[{"role": "user", "content": "What is the capital of France?"}],
                max_tokens=16,
                temperature=0,
            )
            text = reply.choices[0].message.content
            assert text and text.strip(), reply
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert reply.usage is not None and reply.usage.prompt_tokens > 5
            assert reply.usage.prompt_tokens_details is not None

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0, output()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
