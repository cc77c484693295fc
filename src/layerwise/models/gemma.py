"""Gemma 2 and 3 (text): pre- and post-norms around both sublayers, head_dim independent of hidden/heads,
sliding-window and global layers (whose cache layers keep their numbers when a sublayer is removed), embedding
scaling inside the model's forward and Gemma 2's final logit soft-capping (the adapter's logits apply it)."""

from __future__ import annotations

from .adapter import ADAPTERS, ModelAdapter


@ADAPTERS.register("gemma2")
class GemmaAdapter(ModelAdapter):
    model_types = ("gemma2", "gemma3_text")
    attention_post_norm = "post_attention_layernorm"
    mlp_norm = "pre_feedforward_layernorm"
    mlp_post_norm = "post_feedforward_layernorm"
    renumber_kv_layers = False
