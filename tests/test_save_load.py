"""A saved compressed model reloads with identical logits, through layerwise and plain transformers."""

from __future__ import annotations

import json

import torch
from transformers import AutoModelForCausalLM

import layerwise


def test_save_load_identical_logits(tiny, tokens, tmp_path):
    plan = layerwise.plan(tiny, layerwise.Budget.for_sparsity(0.6))
    layerwise.apply(tiny.model, plan)
    out = layerwise.save(tiny, tmp_path / "saved", plan)
    assert {"model.safetensors", "config.json", "plan.json", "layerwise.json", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    reloaded = layerwise.load(str(out))
    with torch.no_grad():
        expected = tiny.model(tokens).logits
        assert torch.equal(reloaded.model(tokens).logits, expected)
        plain = AutoModelForCausalLM.from_pretrained(out)
        assert torch.equal(plain(tokens).logits, expected)
    assert layerwise.Plan.load(out / "plan.json") == plan
    assert json.loads((out / "layerwise.json").read_text())["source"] == "tiny-llama"
    assert reloaded.tokenizer.decode(reloaded.tokenizer("héllo")["input_ids"]) == "héllo"
