"""The Llama layout (Llama, SmolLM, Mistral, Qwen2 with q/k/v biases, Qwen3 and Gemma with per-head-dim q/k
norms that no head slicing touches): pre-norm blocks, separate q/k/v/o with grouped KV heads, a gated MLP."""

from __future__ import annotations

from .adapter import ADAPTERS, ModelAdapter


@ADAPTERS.register("llama")
class LlamaAdapter(ModelAdapter):
    """Every name is the base class's default."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "smollm", "smollm3", "gemma")
