"""Unit tests: CLI flags from EngineConfig, request -> SamplingParams mapping, request parsing."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from llm_serve import cli, engine_args, sampling
from llm_serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
    unsupported_fields,
)
from llm_serve.state import ServerSettings, served_model_name
from paged_engine import EngineConfig


def _serve_args(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["serve", *argv])


def test_every_engine_config_field_is_a_flag() -> None:
    parser = cli.build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    flags = {s for a in serve._actions for s in a.option_strings}
    for f in dataclasses.fields(EngineConfig):
        if f.name != "model":
            assert "--" + f.name.replace("_", "-") in flags, f.name
    for flag in (
        "--host",
        "--port",
        "--served-model-name",
        "--max-queue",
        "--request-timeout",
        "--shutdown-timeout",
    ):
        assert flag in flags


def test_server_flag_defaults() -> None:
    args = _serve_args()
    assert (args.host, args.port, args.max_queue) == ("127.0.0.1", 8000, 1024)
    assert (args.request_timeout, args.shutdown_timeout) == (600.0, 30.0)
    assert args.model is None
    assert engine_args.engine_config_from_args(args, args.model) == EngineConfig()


def test_model_is_positional_or_an_option() -> None:
    for argv in (["m"], ["--model", "m"], ["m", "--model", "m"]):
        args = _serve_args(*argv)
        assert cli._model(args) == "m"
        assert engine_args.engine_config_from_args(args, cli._model(args)).model == "m"
    with pytest.raises(ValueError, match="twice"):
        cli._model(_serve_args("a", "--model", "b"))
    assert cli.main(["serve", "a", "--model", "b"]) == 2
    chat = cli.build_parser().parse_args(["chat", "--model", "m", "--revision", "v1"])
    config = engine_args.engine_config_from_args(chat, cli._model(chat))
    assert (config.model, config.revision) == ("m", "v1")
    assert served_model_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_engine_flags_parse_into_the_config() -> None:
    args = _serve_args(
        "dummy:x.json",
        "--quant-policy",
        "8",
        "--cache-size-limit",
        "0.25",
        "--max-batch-size",
        "4",
        "--num-blocks",
        "none",
        "--device",
        "cpu",
    )
    cfg = engine_args.engine_config_from_args(args, args.model)
    assert cfg.model == "dummy:x.json"
    assert (cfg.quant_policy, cfg.cache_size_limit, cfg.max_batch_size) == (8, 0.25, 4)
    assert cfg.num_blocks is None and cfg.device == "cpu"
    names = {f.name for f in dataclasses.fields(EngineConfig)}
    if "enable_prefix_caching" in names:
        args = _serve_args("--no-enable-prefix-caching", "--cache-ttl", "none")
        cfg = engine_args.engine_config_from_args(args, None)
        assert cfg.enable_prefix_caching is False
        assert cfg.cache_ttl is None  # type: ignore[attr-defined]
    args = _serve_args("--kv-disk-dir", "/tmp/kv", "--kv-disk-size-limit", "1000000")
    cfg = engine_args.engine_config_from_args(args, None)
    assert (cfg.kv_disk_dir, cfg.kv_disk_size_limit) == ("/tmp/kv", 1_000_000)
    assert engine_args.engine_config_from_args(_serve_args(), None).kv_disk_dir is None
    with pytest.raises(SystemExit):
        _serve_args("--max-batch-size", "many")
    with pytest.raises(SystemExit):
        _serve_args("--quant-policy", "3")
    with pytest.raises(ValueError, match="block_size"):
        engine_args.engine_config_from_args(_serve_args("--block-size", "3"), None)
    assert cli.main(["serve", "--block-size", "3"]) == 2


def test_enumerated_flags_list_their_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _serve_args("--help")
    text = " ".join(capsys.readouterr().out.split())
    for flag, choices in engine_args.ENGINE_FLAG_CHOICES.items():
        assert f"--{flag.replace('_', '-')} {{{','.join(str(c) for c in choices)}}}" in text
    assert "--quant-policy {0,8,4}" in text and "--eviction-policy {lru,lfu,hybrid}" in text
    assert _serve_args("--eviction-policy", "lfu").eviction_policy == "lfu"
    with pytest.raises(SystemExit):
        _serve_args("--eviction-policy", "fifo")


@dataclass
class _FutureConfig:
    model: str = "default"
    block_size: int = 16
    new_knob: float | None = None
    fancy_mode: bool = False


def test_engine_flags_follow_the_dataclass(monkeypatch: pytest.MonkeyPatch) -> None:
    """A field the engine gains later becomes a flag with no change to the CLI."""
    monkeypatch.setattr(engine_args, "EngineConfig", _FutureConfig)
    parser = argparse.ArgumentParser()
    engine_args.add_engine_args(parser)
    args = parser.parse_args(["--new-knob", "0.5", "--fancy-mode"])
    cfg = engine_args.engine_config_from_args(args, "m")
    assert cfg == _FutureConfig(model="m", new_knob=0.5, fancy_mode=True)  # type: ignore[comparison-overlap]


def _values(**body: object) -> dict[str, tuple[str, object]]:
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], **body}
    )
    return sampling.request_sampling_values(req)


def test_sampling_values_reach_the_params() -> None:
    p = sampling.sampling_params(_values(top_p=0.5, stop="x", top_k=3, min_p=0.1))
    assert (p.top_p, p.stop, p.top_k, p.min_p) == (0.5, ["x"], 3, 0.1)
    p = sampling.sampling_params(
        _values(min_tokens=2, skip_special_tokens=False, prompt_logprobs=1, max_tokens=4)
    )
    assert (p.min_tokens, p.skip_special_tokens, p.prompt_logprobs) == (2, False, 1)
    # The schema refuses -1 already; past it, the engine's own check names the field too.
    with pytest.raises(APIError) as err:
        sampling.sampling_params({"stop_token_ids": ("stop_token_ids", [-1])})
    assert err.value.status_code == 400 and err.value.param == "stop_token_ids"


def test_sampling_mapping() -> None:
    p = sampling.sampling_params(
        _values(max_completion_tokens=7, temperature=0, seed=1), defaults={"max_tokens": 99}
    )
    assert (p.max_tokens, p.temperature, p.seed) == (7, 0, 1)
    assert sampling.sampling_params(_values(), defaults={"max_tokens": 99}).max_tokens == 99
    with pytest.raises(APIError, match="top_logprobs"):
        _values(top_logprobs=2)
    assert sampling.sampling_params(_values(logprobs=True, top_logprobs=3)).logprobs == 3


def test_parse_request_errors() -> None:
    with pytest.raises(APIError) as e:
        parse_request(CompletionRequest, b"{")
    assert e.value.code == "invalid_json"
    with pytest.raises(APIError) as e:
        parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "max_tokens": true}')
    assert e.value.param == "max_tokens"
    with pytest.raises(APIError) as e:
        parse_request(CompletionRequest, b'{"model": "m", "prompt": "x", "temperature": -0.5}')
    assert e.value.param == "temperature"
    ok = parse_request(CompletionRequest, b'{"model": "m", "prompt": [1, 2], "temperature": 1}')
    assert ok.prompt == [1, 2] and ok.temperature == 1.0


def test_unsupported_fields() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x", "audio": {"id": "a"}}],
            "tools": [],
            "tool_choice": "auto",
            "response_format": {"type": "text"},
            "functions": None,
            "modalities": ["text", "audio"],
        }
    )
    assert unsupported_fields(req) == ["modalities", "messages[0].audio"]


def test_served_model_name() -> None:
    assert served_model_name("default") == "default"
    assert served_model_name("dummy:smollm2-135m") == "dummy:smollm2-135m"
    assert served_model_name("dummy:/models/tiny/config.json") == "dummy:tiny"
    assert served_model_name("dummy:/models/shape.json,tokenizer=default") == "dummy:shape"
    assert served_model_name("/models/Qwen3-0.6B/") == "Qwen3-0.6B"
    assert served_model_name("/m/SmolLM2.Q4_1.gguf") == "SmolLM2.Q4_1"
    with pytest.raises(ValueError):
        ServerSettings(model_name="m", max_queue=0)


def test_kv_int4_layout_flag(capsys: pytest.CaptureFixture[str]) -> None:
    cfg = engine_args.engine_config_from_args(
        _serve_args("--quant-policy", "4", "--kv-int4-layout", "token"), None
    )
    assert (cfg.quant_policy, cfg.kv_int4_layout) == (4, "token")
    assert engine_args.engine_config_from_args(_serve_args(), None).kv_int4_layout == (
        "block-channel"
    )
    with pytest.raises(SystemExit):
        _serve_args("--kv-int4-layout", "channel")
    with pytest.raises(SystemExit):
        _serve_args("--help")
    assert "--kv-int4-layout {block-channel,token}" in " ".join(capsys.readouterr().out.split())
