"""Phi-3: a fused ``qkv_proj`` (all q rows, then k, then v) and a fused ``gate_up_proj`` (gate rows, then up
rows); its attention reads head counts from the config, so a sliced attention gets a config of its own."""

from __future__ import annotations

from .adapter import ADAPTERS, ModelAdapter


@ADAPTERS.register("phi3")
class Phi3Adapter(ModelAdapter):
    model_types = ("phi3",)
    attention_roles = {"qkv": "qkv_proj", "o": "o_proj"}
    mlp_roles = {"gate_up": "gate_up_proj", "down": "down_proj"}
    qkv_layout = "stacked"
