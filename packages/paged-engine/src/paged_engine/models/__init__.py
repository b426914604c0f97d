"""Model implementations (one decoder for the Llama family)."""

from .config import ModelConfig
from .llama import AttentionMetadata, LlamaForCausalLM

__all__ = ["AttentionMetadata", "LlamaForCausalLM", "ModelConfig"]
