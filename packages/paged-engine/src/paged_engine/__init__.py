"""paged_engine: a paged-KV LLM engine with continuous batching and KV quantization.

Offline::

    from paged_engine import EngineConfig, LLMEngine, SamplingParams
    engine = LLMEngine(EngineConfig(model="default"))
    outputs = engine.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0))
"""

from .block_pool import BlockPool
from .config import EngineConfig
from .llm_engine import EngineFailedError, LLMEngine, PromptTooLongError
from .model_loader import DUMMY_PRESETS
from .outputs import EngineStats, RequestOutput
from .sampling_params import ParamError, SamplingParams
from .structured_output import StructuredOutput
from .tokenizer import ByteTokenizer

__version__ = "0.1.0"

__all__ = [
    "DUMMY_PRESETS",
    "BlockPool",
    "ByteTokenizer",
    "EngineConfig",
    "EngineFailedError",
    "EngineStats",
    "LLMEngine",
    "ParamError",
    "PromptTooLongError",
    "RequestOutput",
    "SamplingParams",
    "StructuredOutput",
]
