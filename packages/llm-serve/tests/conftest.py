"""Shared helpers: a tiny random model, real server processes, and an in-process server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

# Tiny models: one thread is fastest, and a second one spin-waits against the server's.
torch.set_num_threads(1)

TINY_CONFIG: dict[str, Any] = {
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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The spec of a tiny random llama (byte tokenizer, vocab 320 masked to 257)."""
    root = tmp_path_factory.mktemp("tiny") / "tiny"
    root.mkdir()
    (root / "config.json").write_text(json.dumps(TINY_CONFIG))
    return f"dummy:{root / 'config.json'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``llm-serve serve`` in a subprocess on a free port of 127.0.0.1."""

    def __init__(self, args: Sequence[str], model_name: str = "tiny") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model_name
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        self.log_path = Path(tempfile.gettempdir()) / f"llm-serve-test-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llm_serve.cli",
                "serve",
                *args,
                "--port",
                str(self.port),
                "--served-model-name",
                model_name,
                *([] if "--log-level" in args else ["--log-level", "warning"]),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def wait(self, timeout: float = 120.0) -> ServerProcess:
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            raise TimeoutError(f"server not healthy within {timeout} s:\n{self.log()}")
        except BaseException:
            self.stop()
            raise

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        if not self._log.closed:
            self._log.close()
            self.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def start_server() -> Iterator[Any]:
    """Factory: ``start_server(args, model_name="tiny")`` -> a healthy ``ServerProcess``.
    Every process it started is killed at the end of the session (``stop()`` kills earlier)."""
    started: list[ServerProcess] = []

    def make(args: Sequence[str], model_name: str = "tiny") -> ServerProcess:
        server = ServerProcess(args, model_name)
        started.append(server)
        return server.wait()

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def in_process_server() -> Any:
    """The ``InProcessServer`` class (uvicorn in a thread of the test process)."""
    return InProcessServer


class InProcessServer:
    """A ``build_app`` app served by uvicorn in a thread of the test process, so tests can
    look at its engine directly."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("in-process server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
