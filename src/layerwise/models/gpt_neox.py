"""GPT-NeoX (Pythia): a fused ``query_key_value`` interleaved per head (q, k, v rows of head 0, then head 1),
no grouped KV heads, biases everywhere, an ungated MLP, LayerNorms, and (usually) a parallel residual: the MLP
reads the block input, not the attention's output."""

from __future__ import annotations

from .adapter import ADAPTERS, ModelAdapter


@ADAPTERS.register("gpt_neox")
class GPTNeoXAdapter(ModelAdapter):
    model_types = ("gpt_neox",)
    attention_module = "attention"
    final_norm = "gpt_neox.final_layer_norm"
    attention_roles = {"qkv": "query_key_value", "o": "dense"}
    mlp_roles = {"up": "dense_h_to_4h", "down": "dense_4h_to_h"}
    qkv_layout = "interleaved"

    @property
    def parallel_residual(self) -> bool:
        return bool(getattr(self.config, "use_parallel_residual", True))
