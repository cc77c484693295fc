"""Every structure on every adapted decoder family: width slicing (equal to masking), depth removal,
quantization and runtime profiles apply, save and reload with identical logits; compress runs end to end
on each family's saved directory, as a user would give their own model."""

from __future__ import annotations

import json

import pytest
import torch
from families import FAMILIES, family_model, save_family
from typer.testing import CliRunner

import layerwise
from layerwise.cli import app
from layerwise.models import get_adapter
from layerwise.models.width import UnitMask
from layerwise.ops import apply_plan, architecture_signature
from layerwise.ops.depth import RemoveAction
from layerwise.ops.quantize import QuantizeAction
from layerwise.ops.structured import SliceAction, record_layer_dims, slice_attention, slice_mlp
from layerwise.plan import Plan

runner = CliRunner()
IDS = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(3))


def _logits(loaded: layerwise.LoadedModel) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(input_ids=IDS).logits


def _plan(loaded: layerwise.LoadedModel, actions: list) -> Plan:
    return Plan(model=loaded.spec, architecture=architecture_signature(loaded.model), budget=layerwise.Budget(),
                allocator="test", method="test", actions=actions)


def _reloads_identically(loaded: layerwise.LoadedModel, plan: Plan, path) -> None:
    expected = _logits(loaded)
    layerwise.save(loaded, path, plan)
    assert torch.equal(_logits(layerwise.load(str(path))), expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_width_slicing_equals_masking_saves_and_reloads(family, tmp_path):
    loaded = family_model(family)
    adapter = get_adapter(loaded.model)
    geometry = adapter.head_geometry(0)
    keep_groups, dropped_groups = [geometry.num_kv_heads - 1], list(range(geometry.num_kv_heads - 1))
    width = adapter.ffn_width(1)
    keep_channels = [c for c in range(width) if c % 3]  # a scattered two thirds
    masks = []
    for sublayer, dropped in ((adapter.attention(0), dropped_groups),
                              (adapter.mlp(1), [c for c in range(width) if c not in keep_channels])):
        masks.append(UnitMask(sublayer.module, adapter.layout(sublayer)))
        masks[-1].set(dropped)
    masked = _logits(loaded)
    for mask in masks:
        mask.remove()
    slice_attention(adapter, 0, keep_groups)
    slice_mlp(adapter, 1, keep_channels)
    record_layer_dims(loaded.model)
    sliced = _logits(loaded)
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-5)
    assert adapter.head_geometry(0).num_kv_heads == 1 and adapter.ffn_width(1) == len(keep_channels)
    plan = _plan(loaded, [SliceAction(unit=adapter.attention(0).name, keep=geometry.group_size, method="act"),
                          SliceAction(unit=adapter.mlp(1).name, keep=len(keep_channels), method="act")])
    _reloads_identically(loaded, plan, tmp_path / "width")


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_removal_saves_and_reloads(family, tmp_path):
    loaded = family_model(family)
    adapter = get_adapter(loaded.model)
    dense = _logits(loaded)
    plan = _plan(loaded, [RemoveAction(unit=adapter.attention(0).name), RemoveAction(unit=adapter.mlp(1).name),
                          RemoveAction(unit=adapter.attention(2).name), RemoveAction(unit=adapter.mlp(2).name)])
    apply_plan(loaded.model, plan)
    removed = _logits(loaded)
    assert not torch.allclose(removed, dense)
    assert [s.name for s in adapter.all_sublayers()] == [adapter.mlp(0).name, adapter.attention(1).name]
    _reloads_identically(loaded, plan, tmp_path / "depth")


@pytest.mark.parametrize("family", FAMILIES)
def test_quantization_saves_and_reloads(family, tmp_path):
    loaded = family_model(family)
    dense = _logits(loaded)
    units = list(layerwise.models.decoder_linears(loaded.model))
    plan = _plan(loaded, [QuantizeAction(unit=u, bits=4, group_size=32) for u in units])
    apply_plan(loaded.model, plan)
    quantized = _logits(loaded)
    assert 0 < float((quantized - dense).abs().max()) < 5
    _reloads_identically(loaded, plan, tmp_path / "quant")


def _importance(adapter, seed: int = 0):
    from layerwise.runtime.profiles import Importance

    generator = torch.Generator().manual_seed(seed)
    blocks = range(adapter.num_blocks)
    groups = {b: torch.randperm(adapter.head_geometry(b).num_kv_heads, generator=generator).tolist() for b in blocks}
    channels = {b: torch.randperm(adapter.ffn_width(b), generator=generator).tolist() for b in blocks}
    scores = {b: [float(len(order) - i) for i in range(len(order))] for b, order in groups.items()}
    return Importance(groups, channels, list(reversed(blocks)), scores)


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_profiles_switch_and_restore_exactly(family):
    from layerwise.runtime.profiles import ProfileSet, ProfileSpec

    loaded = family_model(family)
    before = _logits(loaded)
    adapter = get_adapter(loaded.model)
    specs = [ProfileSpec("none"), ProfileSpec("attention_heads", 0.5), ProfileSpec("ffn_neurons", 0.5),
             ProfileSpec("transformer_layers", 0.34)]
    sliced = ProfileSet(loaded.model, _importance(adapter), specs, mechanism="sliced")
    dense = _logits(loaded)
    torch.testing.assert_close(dense, before, rtol=1e-4, atol=1e-5)  # the importance permutation keeps the function
    masked_model = family_model(family)
    masked = ProfileSet(masked_model.model, _importance(get_adapter(masked_model.model)), specs, mechanism="mask")
    for spec in specs[1:]:
        with sliced.using(spec.name):
            light = _logits(loaded)
        with masked.using(spec.name):
            reference = _logits(masked_model)
        assert not torch.allclose(light, dense)
        torch.testing.assert_close(light, reference, rtol=1e-4, atol=1e-5)  # the views compute what masks do
        assert torch.equal(_logits(loaded), dense)  # restored bit for bit


@pytest.mark.parametrize("family", FAMILIES)
def test_compress_runs_every_structure_on_a_saved_family_directory(family, tmp_path):
    path = save_family(family, tmp_path / family)
    common = ["--model", path, "--nsamples", "2", "--seqlen", "32", "--max-windows", "1", "--no-latency"]
    runs = {
        "unstructured": ["--method", "wanda", "--sparsity", "0.5"],
        "width": ["--structure", "width", "--pruning-ratio", "0.2", "--method", "taylor", "--taylor-seq-len", "16"],
        "depth": ["--structure", "depth", "--allocator", "sleb", "--num-remove-sublayers", "1"],
        "quant": ["--structure", "quant", "--bits", "4", "--group-size", "32"],
    }
    dense = _logits(layerwise.load(path))
    for structure, options in runs.items():
        out = tmp_path / structure
        result = runner.invoke(app, ["compress", *common, *options, "--out", str(out)])
        assert result.exit_code == 0, f"{family} {structure}: {result.output}"
        record = json.loads((out / "result.json").read_text())
        # the saved run reloads as the compressed model: its perplexity is the run's, its logits are not dense
        reloaded = layerwise.load(str(out))
        again = layerwise.evaluate(reloaded, layerwise.RunSettings(seqlen=32, max_windows=1))
        assert again.ppl == pytest.approx(record["metrics"]["ppl"], rel=1e-5), f"{family} {structure}"
        assert not torch.allclose(_logits(reloaded), dense), f"{family} {structure}"
