"""GGUF export of every adapted family: a tiny random model of each, exported in llama.cpp's own architecture,
tensor names and metadata, computes in llama.cpp what it computes in PyTorch — as float, with a mixed plan of
GGUF types, and narrowed to one width for every layer; per-layer widths only where llama.cpp can express them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, family_model
from gguf import GGUFReader

import layerwise
from layerwise.allocate.joint.space import Budgets
from layerwise.config import Budget
from layerwise.engines.llamacpp import LlamaCppModel
from layerwise.errors import ExportError
from layerwise.export import export_gguf
from layerwise.models import decoder_linears, get_adapter
from layerwise.ops import apply_plan, architecture_signature
from layerwise.ops.quantize import QuantizeAction
from layerwise.ops.structured import record_layer_dims, slice_attention, slice_mlp
from layerwise.plan import Plan
from layerwise.structures.joint import _space

# llama.cpp's architecture for each family (Mistral runs as llama, as llama.cpp's converter writes it)
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "gemma": "gemma", "qwen2": "qwen2", "qwen3": "qwen3",
                 "olmo2": "olmo2", "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3", "gpt_neox": "gptneox"}
MIXED = ["q8_0", "q4_0", "q5_1", "q4_1", "q5_0"]
# llama.cpp runs Mistral as llama, without its sliding window (as llama.cpp's own converter writes it): the
# export computes the original exactly up to the window (64 tokens here), and says so
EXACT_UP_TO = {"mistral": 64}


@pytest.fixture(scope="module")
def window() -> torch.Tensor:
    """One window of 128 byte tokens: longer than the sliding windows of the Gemma configs (16) and Mistral's (64)."""
    return torch.randint(0, 256, (128,), generator=torch.Generator().manual_seed(3))


def _compare(loaded, path, window: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, relative perplexity difference) of llama.cpp running ``path`` against PyTorch."""
    window = window[: EXACT_UP_TO.get(loaded.model.config.model_type, window.numel())]
    with torch.no_grad():
        ours = loaded.model(input_ids=window[None]).logits[0].float()
    with LlamaCppModel(path, window.numel()) as model:
        theirs = model.logits(window)
    agreement = float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())

    def ppl(logits: torch.Tensor) -> float:
        return math.exp(float(F.cross_entropy(logits[:-1], window[1:])))

    return agreement, abs(ppl(theirs) / ppl(ours) - 1)


# llama.cpp's loaders for these shape q and o as hidden x hidden: their attention cannot be narrowed
FULL_QUERY_WIDTH = {"qwen2", "olmo2", "phi3", "gpt_neox"}


def _narrowed(loaded, per_layer: bool, attention: bool) -> None:
    """Half the FFN (and with ``attention`` half the KV groups, or heads) in every block, or (``per_layer``) only in
    the first."""
    adapter = get_adapter(loaded.model)
    for block in range(1 if per_layer else adapter.num_blocks):
        if attention:
            groups = adapter.head_geometry(block).num_kv_heads
            slice_attention(adapter, block, list(range(max(1, groups // 2))))
        slice_mlp(adapter, block, list(range(adapter.ffn_width(block) // 2)))
    record_layer_dims(loaded.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_float_export_computes_what_pytorch_computes(family, window, tmp_path):
    loaded = family_model(family)
    report = export_gguf(loaded, tmp_path / "model.gguf", "f32")
    assert report.architecture == ARCHITECTURES[family]
    assert str(GGUFReader(report.path).fields["general.architecture"].contents()) == ARCHITECTURES[family]
    assert any("no sliding window" in note for note in report.notes) == (family in EXACT_UP_TO)
    agreement, ppl_error = _compare(loaded, report.path, window)
    assert agreement >= 0.999 and ppl_error <= 0.001, (agreement, ppl_error)


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_gguf_types_export_byte_for_byte_and_agree(family, window, tmp_path):
    loaded = family_model(family)
    units = list(decoder_linears(loaded.model))
    from layerwise.export.gguf_export import gguf_tensor_names

    names = gguf_tensor_names(loaded.model)
    actions = [QuantizeAction(unit=unit, bits=int(MIXED[i % len(MIXED)][1]), group_size=None, method="gguf",
                              format=MIXED[i % len(MIXED)]) for i, unit in enumerate(units)]
    apply_plan(loaded.model, Plan(model=loaded.spec, architecture=architecture_signature(loaded.model),
                                  budget=Budget(), allocator="test", method="gguf", actions=actions))
    report = export_gguf(loaded, tmp_path / "mixed.gguf", "f16", embedding_type="f32")
    tensors = {t.name: t for t in GGUFReader(report.path).tensors}
    stored = {name: tensor.tensor_type.name.lower() for name, tensor in tensors.items()}
    down = next(unit for unit in units if names[unit].endswith("ffn_down.weight"))  # rows kept in their order
    raw = np.asarray(tensors[names[down]].data).reshape(-1)
    assert np.array_equal(raw, loaded.model.get_submodule(down).qdata.numpy().reshape(-1))  # byte for byte
    planned = {unit: action.format for unit, action in zip(units, actions)}
    assert len(names) == len(units) and {stored[names[unit]] for unit in units} == set(MIXED)
    assert all(stored[names[unit]] == planned[unit] for unit in units)
    agreement, ppl_error = _compare(loaded, report.path, window)
    # llama.cpp rounds activations to 8 bits for its integer dot products: close, not identical
    assert ppl_error <= 0.015 and agreement >= 0.9, (agreement, ppl_error)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_width_for_every_layer_exports_and_per_layer_widths_only_for_llama(family, window, tmp_path):
    uniform = family_model(family)
    _narrowed(uniform, per_layer=False, attention=family not in FULL_QUERY_WIDTH)
    report = export_gguf(uniform, tmp_path / "narrow.gguf", "f32")
    assert report.architecture == ARCHITECTURES[family]
    agreement, ppl_error = _compare(uniform, report.path, window)
    assert agreement >= 0.99 and ppl_error <= 0.01, (agreement, ppl_error)
    per_layer = family_model(family)
    _narrowed(per_layer, per_layer=True, attention=family not in FULL_QUERY_WIDTH)
    if ARCHITECTURES[family] == "llama":
        report = export_gguf(per_layer, tmp_path / "deci.gguf", "f32")
        assert report.architecture == "deci"
        agreement, ppl_error = _compare(per_layer, report.path, window)
        assert agreement >= 0.99 and ppl_error <= 0.01, (agreement, ppl_error)
    else:
        with pytest.raises(ExportError, match=f"llama.cpp's {ARCHITECTURES[family]} architecture takes one width "
                                              "for every layer"):
            export_gguf(per_layer, tmp_path / "per-layer.gguf", "f32")
        assert not (tmp_path / "per-layer.gguf").exists()
    if family in FULL_QUERY_WIDTH:
        heads = family_model(family)
        _narrowed(heads, per_layer=False, attention=True)
        with pytest.raises(ExportError, match="needs query heads x head size = hidden size .* narrowed MLPs can"):
            export_gguf(heads, tmp_path / "heads.gguf", "f32")


def _no_calibration(monkeypatch) -> None:
    """Fail the test if any calibration starts: a refusal that follows from the family must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("calibration started before the refusal")

    monkeypatch.setattr("layerwise.pipeline.CalibrationSource", refuse)


def test_refusals_that_follow_from_the_family_come_before_any_calibration(tmp_path, monkeypatch):
    """SPRINT's default tuning and AWQ on a post-norm family, and per-layer widths or removals exported from a
    family llama.cpp runs with one width per layer: one sentence, exit 2, in seconds, with nothing calibrated."""
    import time

    from families import save_family
    from typer.testing import CliRunner

    from layerwise.cli import app

    _no_calibration(monkeypatch)
    runner = CliRunner()
    olmo2, qwen2 = save_family("olmo2", tmp_path / "olmo2"), save_family("qwen2", tmp_path / "qwen2")
    qwen3 = save_family("qwen3", tmp_path / "qwen3")
    recipe = tmp_path / "recipe.yaml"  # a staged recipe is checked stage by stage before its first calibration
    recipe.write_text("stages:\n  - prune: {structure: depth, allocator: sprint, target_speedup: 1.2}\n"
                      "  - heal: {method: kd, tokens: 128}\n")
    cases = [
        (["compress", "--model", olmo2, "--structure", "depth", "--allocator", "sprint", "--target-speedup", "1.2"],
         "SPRINT's in-compression tuning refits down_proj against the residual stream"),
        (["compress", "--model", qwen3, "--structure", "width", "--allocator", "rl", "--pruning-ratio", "0.2",
          "--export", "gguf"], "per-layer widths export for the Llama family only"),
        (["compress", "--model", qwen2, "--structure", "width", "--allocator", "uniform", "--pruning-ratio", "0.2",
          "--export", "gguf"], "narrowed attention cannot be exported for the qwen2 family; narrowed MLPs can"),
        (["compress", "--model", qwen2, "--structure", "depth", "--allocator", "sleb", "--target-speedup", "1.2",
          "--export", "gguf"], "removed sublayers export for the Llama family only"),
        (["plan", "--model", olmo2, "--structure", "depth", "--allocator", "sprint", "--target-speedup", "1.2"],
         "SPRINT's in-compression tuning"),
        (["compress", "--model", olmo2, "--recipe", str(recipe)], "SPRINT's in-compression tuning"),
        (["compress", "--model", olmo2, "--structure", "quant", "--bits", "4", "--awq"],
         "AWQ folds its scales into pre-norms and separate q/k/v and gate/up projections"),
        (["compress", "--model", qwen2, "--structure", "quant", "--method", "gguf", "--allocator", "greedy",
          "--bits", "q4_0,q8_0", "--max-bytes", "20000"], "below the smallest file these types reach"),
        (["compress", "--model", qwen2, "--structure", "quant", "--method", "gguf", "--allocator", "greedy",
          "--bits", "q4_0,q8_0", "--avg-bits", "3"], "below the smallest average these types reach, 4.5 bits"),
    ]
    for index, (command, message) in enumerate(cases):
        out = tmp_path / f"out{index}"
        started = time.perf_counter()
        result = runner.invoke(app, [*command, "--out", str(out if command[0] == "compress" else f"{out}.json")])
        elapsed = time.perf_counter() - started
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split()), result.output
        assert elapsed < 5.0, elapsed
        assert not out.exists()
    # the same request stays open where llama.cpp can express it (per-layer widths of the Llama family, as deci):
    # the checks pass and the run goes on to calibrate, which this test forbids
    llama = runner.invoke(app, ["compress", "--model", save_family("llama", tmp_path / "llama"), "--structure",
                                "width", "--allocator", "rl", "--pruning-ratio", "0.2", "--export", "gguf", "--out",
                                str(tmp_path / "llama-out")])
    assert "calibration started before the refusal" in str(llama.exception), llama.output


def test_a_joint_byte_budget_no_level_reaches_says_the_smallest_that_does_before_calibrating(tmp_path, monkeypatch):
    """Below what the embedding, output and final norm take (and every sublayer removed), no plan fits: the
    refusal names the smallest budget, through the CLI, in seconds, before any calibration."""
    import re
    import time

    from typer.testing import CliRunner

    from layerwise.cli import app

    _no_calibration(monkeypatch)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--structure", "joint", "--allocator",
                                      "greedy", "--max-bytes", "1000", "--out", str(tmp_path / "run")])
    elapsed = time.perf_counter() - started
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and elapsed < 5.0, (result.output, elapsed)
    smallest = re.search(r"raise it to at least ([\d,]+)", text)
    assert smallest and "the token embedding, output and final norm, which no level shrinks" in text, text
    floor = int(smallest.group(1).replace(",", ""))
    model = layerwise.load("tiny-llama").model
    _space(model, {}, Budgets(floor, None), False).uniform()  # the named floor itself fits
    with pytest.raises(layerwise.BudgetError):
        _space(model, {}, Budgets(floor - 1, None), False).uniform()
