"""Adapter for the Llama layout, shared by Llama, SmolLM, Mistral and Qwen2."""

from __future__ import annotations

from .adapter import ADAPTERS, ModelAdapter


@ADAPTERS.register("llama")
class LlamaAdapter(ModelAdapter):
    """Pre-norm blocks with ``self_attn`` (q/k/v/o, grouped KV heads) and a gated ``mlp``."""

    model_types = ("llama", "mistral", "qwen2", "smollm")
    attention_module = "self_attn"
    mlp_module = "mlp"
    attention_norm = "input_layernorm"
    mlp_norm = "post_attention_layernorm"
    final_norm = "model.norm"
    attention_roles = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    mlp_roles = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
