"""OLMo 2: no pre-norms but post-norms on each sublayer's output, and q/k norms over the whole projection, so
they are sliced with the heads."""

from __future__ import annotations

from .adapter import ADAPTERS, ModelAdapter


@ADAPTERS.register("olmo2")
class Olmo2Adapter(ModelAdapter):
    model_types = ("olmo2",)
    attention_norm = None
    attention_post_norm = "post_attention_layernorm"
    mlp_norm = None
    mlp_post_norm = "post_feedforward_layernorm"
    head_norms = {"q_norm": "q", "k_norm": "k"}
