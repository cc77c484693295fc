"""Tiny randomly initialised models of the decoder families layerwise adapts, built from each family's own
transformers config (seconds, no files)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

import layerwise
from layerwise.models.tiny import byte_tokenizer

COMMON = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
              eos_token_id=256, pad_token_id=257)

# family -> (transformers config class name, overrides): what makes each family itself
FAMILIES: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"head_dim": 16, "sliding_window": 64}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),  # RMSNorm as (1 + w), GELU, embedding scaled by sqrt(hidden)
    "qwen2": ("Qwen2Config", {}),  # q/k/v biases
    "qwen3": ("Qwen3Config", {"head_dim": 16}),  # q/k norms over head_dim
    "olmo2": ("Olmo2Config", {}),  # post-norms only, q/k norms over the whole projection
    "gemma2": ("Gemma2Config", {"head_dim": 24, "sliding_window": 16, "final_logit_softcapping": 30.0,
                                "query_pre_attn_scalar": 24}),  # head_dim != hidden/heads, pre+post norms
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 24, "sliding_window": 16, "query_pre_attn_scalar": 24}),
    "phi3": ("Phi3Config", {}),  # fused qkv and gate_up
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None, "use_parallel_residual": True,
                                   "rotary_pct": 0.5}),  # fused interleaved qkv, parallel residual, LayerNorm
}


def family_model(family: str, seed: int = 0) -> layerwise.LoadedModel:
    """A tiny float32 ``family`` model in eval mode with the byte tokenizer."""
    import transformers

    name, overrides = FAMILIES[family]
    settings = {**COMMON, **overrides}
    settings = {k: v for k, v in settings.items() if v is not None}
    config = getattr(transformers, name)(**settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    return layerwise.LoadedModel(model=model, tokenizer=byte_tokenizer(), spec=f"tiny-{family}", source="test")


def save_family(family: str, path) -> str:
    """``family_model`` saved as a Hugging Face directory (as a user's own model would be)."""
    loaded = family_model(family)
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return str(path)
