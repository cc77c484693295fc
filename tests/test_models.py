"""Loading, layer types, adapter geometry and generic discovery."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import layerwise
from layerwise.models import decoder_linears, get_adapter


def test_tiny_llama_is_plain_float32_linears(tiny):
    linears = decoder_linears(tiny.model)
    assert len(linears) == 4 * 7
    assert all(type(m) is nn.Linear for m in linears.values())
    assert all(p.dtype == torch.float32 for p in tiny.model.parameters())
    assert not hasattr(tiny.model.config, "quantization_config")
    assert list(linears)[0] == "model.layers.0.self_attn.q_proj"


def test_tiny_llama_is_deterministic():
    a, b = layerwise.load("tiny-llama"), layerwise.load("tiny-llama")
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_adapter_geometry_follows_shapes(tiny):
    adapter = get_adapter(tiny.model)
    assert adapter.num_blocks == 4
    geometry = adapter.head_geometry(2)
    assert (geometry.num_heads, geometry.num_kv_heads, geometry.head_dim, geometry.group_size) == (4, 2, 16, 2)
    assert adapter.ffn_width(0) == 160
    attention, mlp = adapter.sublayers(1)
    assert attention.name == "model.layers.1.self_attn" and mlp.name == "model.layers.1.mlp"
    assert set(attention.linears) == {"q", "k", "v", "o"}
    assert mlp.linears["down"].weight.shape == (64, 160)
    assert attention.linears["k"].out_features == 2 * 16


def test_unknown_family_gets_clear_structural_error(unadapted_dir):
    opt = layerwise.load(unadapted_dir)
    with pytest.raises(layerwise.UnsupportedArchitectureError, match="model type 'opt'.*unstructured"):
        get_adapter(opt.model)


def test_unstructured_pruning_works_without_adapter(unadapted_dir):
    neox = layerwise.load(unadapted_dir)
    plan = layerwise.plan(neox, layerwise.Budget.for_sparsity(0.5))
    layerwise.apply(neox.model, plan)
    linears = decoder_linears(neox.model)
    assert {n.split(".")[-1] for n in linears} >= {"q_proj", "fc1", "fc2"}
    zeros = sum(int((m.weight == 0).sum()) for m in linears.values())
    assert zeros == round(0.5 * sum(m.weight.numel() for m in linears.values()))


def test_unknown_model_names_what_was_tried():
    with pytest.raises(layerwise.ModelNotFoundError, match="not a named model \\(smollm2-135m, tiny-llama\\)"):
        layerwise.load("no-such-model")


def test_existing_path_of_wrong_kind(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(layerwise.ModelNotFoundError, match="neither a directory with config.json"):
        layerwise.load(str(tmp_path / "weights.bin"))


def test_bfloat16_load(tiny):
    model = layerwise.load("tiny-llama", dtype="bfloat16").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.raises(layerwise.LayerwiseError, match="Unknown dtype 'int3'"):
        layerwise.load("tiny-llama", dtype="int3")
