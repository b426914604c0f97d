"""schemathesis over the server's own OpenAPI document, against a tiny random model: no
request it generates (valid or not) may get a 5xx, and every answer must match the document
(status, content type, body schema), with schemathesis' default checks.

One default check is left out: ``positive_data_acceptance`` (every schema-valid request gets
2xx). The server rightly refuses some schema-valid requests for reasons no JSON schema can
state: a prompt whose token count leaves no room in the context, an empty prompt, a field of
the OpenAI API it does not implement, a JSON number such as ``5.0`` where an integer is due
(requests are parsed strictly). Those get 400 with OpenAI's error body, which the other
checks verify."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings

from llm_serve import ServerSettings, build_app
from llm_serve.connections import uvicorn_config
from paged_engine import EngineConfig

TINY = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 16,
    "max_position_embeddings": 1024,
}
# A short context bounds the work of any one generated request (n <= 128 choices of at most
# 64 tokens), so the whole run stays around a minute on two cores.
MAX_MODEL_LEN = 64
EXAMPLES_PER_OPERATION = 25


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import uvicorn

    root: Path = tmp_path_factory.mktemp("fuzz")
    (root / "config.json").write_text(json.dumps(TINY))
    config = EngineConfig(
        model=f"dummy:{root / 'config.json'}",
        device="cpu",
        num_blocks=256,
        max_model_len=MAX_MODEL_LEN,
    )
    app = build_app(config, ServerSettings(model_name="tiny", request_timeout=60))
    port = _free_port()
    server = uvicorn.Server(
        uvicorn_config(app, "127.0.0.1", port, "warning", 10.0, 1024, graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.2)
    yield SimpleNamespace(schema=schemathesis.openapi.from_url(f"{url}/openapi.json"), url=url)
    server.should_exit = True
    thread.join(30)


def test_api_matches_its_schema_and_never_fails(api: Any) -> None:
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    failures: list[str] = []
    for result in api.schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(mode))
            @settings(
                max_examples=EXAMPLES_PER_OPERATION,
                deadline=None,
                derandomize=True,
                phases=[Phase.explicit, Phase.generate],  # no shrinking: report as found
                suppress_health_check=list(HealthCheck),
                database=None,
            )
            def run(case: Any) -> None:
                case.call_and_validate(timeout=60, excluded_checks=[positive_data_acceptance])

            try:
                run()
            except Unsatisfiable:  # no invalid input exists (a GET without parameters)
                continue
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # schemathesis reports an exception group
                failures.append(f"{operation.label} ({mode.value}): {exc}"[:3000])
    assert not failures, "\n\n".join(failures)
    # Generated requests reached the engine, and none of them left blocks or requests behind.
    import httpx

    stats = httpx.get(f"{api.url}/v1/cache/stats", timeout=30).json()
    assert "prompt_tokens_total" in stats, stats
    assert stats["prompt_tokens_total"] > 0 and stats["generation_tokens_total"] > 0, stats
    deadline = time.monotonic() + 30
    while stats["num_blocks_used"] or stats["num_running"] or stats["num_waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.2)
        stats = httpx.get(f"{api.url}/v1/cache/stats", timeout=30).json()
