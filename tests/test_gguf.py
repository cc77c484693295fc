"""GGUF deployment: llama.cpp's types and quantizers, the exporter (llama and deci), llama.cpp as an engine."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import layerwise
from layerwise.cli import app
from layerwise.errors import ExportError, ModelNotFoundError
from layerwise.export import export_gguf
from layerwise.gguf import GGUF_TYPES, gguf_type, stored_type
from layerwise.gguf.quantize import _ggml_quantize, dequantize_matrix, quantize_matrix
from layerwise.models import decoder_linears
from layerwise.ops import apply_plan, architecture_signature
from layerwise.ops.quantize import QuantizeAction
from layerwise.plan import Plan

runner = CliRunner()


def _wide_llama(seed: int = 0) -> layerwise.LoadedModel:
    """A tiny Llama whose rows (256, 512) fit llama.cpp's 256-weight k-quant blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from layerwise.models.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=256, pad_token_id=257)
    model = LlamaForCausalLM(config).float().eval()
    return layerwise.LoadedModel(model=model, tokenizer=tokenizer, spec="wide-llama", source="test")


def _quant_plan(loaded: layerwise.LoadedModel, kinds: list[str], imatrix: bool = False) -> Plan:
    units = list(decoder_linears(loaded.model))
    actions = [QuantizeAction(unit=u, bits=int(kinds[i % len(kinds)][1]), group_size=None, method="gguf",
                              format=kinds[i % len(kinds)], imatrix=imatrix) for i, u in enumerate(units)]
    return Plan(model=loaded.spec, architecture=architecture_signature(loaded.model), budget=layerwise.Budget(),
                allocator="test", method="gguf", actions=actions)


def _llama_cpp_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from layerwise.engines.llamacpp import LlamaCppModel

    with LlamaCppModel(path, n_ctx=ids.numel()) as model:
        return model.logits(ids)


def _agreement(ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, float]:
    """(max |logit difference|, top-1 agreement) of two [positions, vocab] logit matrices."""
    return float((ours - theirs).abs().max()), float((ours.argmax(-1) == theirs.argmax(-1)).float().mean())


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1))


def test_types_fall_back_as_llama_quantize_does():
    assert stored_type("q4_k", 576).name == "q5_0"  # SmolLM2's 576-wide rows cannot hold 256-weight blocks
    assert stored_type("q6_k", 576).name == "q8_0"
    assert stored_type("q3_k", 576).name == "q4_0"
    assert stored_type("q4_k", 1536).name == "q4_k"
    assert stored_type("q4_0", 100).name == "f16"  # not even a 32-block fits
    assert gguf_type("Q4_K").bits_per_weight == 4.5 and gguf_type("q6_k").bits_per_weight == 6.5625


@pytest.mark.parametrize("name", ["q8_0", "q5_1", "q5_0", "q4_1", "q4_0"])
def test_numpy_reference_and_ggml_quantizers_write_the_same_bytes(name):
    weight = torch.randn(48, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    kind = GGUF_TYPES[name]
    ours = quantize_matrix(weight, kind)
    assert ours.shape == (48, kind.nbytes(1, 256))
    assert np.array_equal(ours, _ggml_quantize(weight.numpy(), kind, None, 2))


def test_k_quant_error_falls_with_bits_and_the_importance_matrix_changes_the_codes():
    weight = torch.randn(64, 512, generator=torch.Generator().manual_seed(0))
    errors = []
    for name in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"):
        kind = GGUF_TYPES[name]
        restored = dequantize_matrix(quantize_matrix(weight, kind), kind, tuple(weight.shape))
        errors.append(float((restored - weight).pow(2).mean()))
    assert errors == sorted(errors, reverse=True)
    importance = np.linspace(0.01, 10, 512).astype(np.float32)
    plain, weighted = quantize_matrix(weight, GGUF_TYPES["q4_k"]), quantize_matrix(weight, GGUF_TYPES["q4_k"], importance)
    assert not np.array_equal(plain, weighted)
    # weighted by importance, the important columns come out closer
    for raw in (plain, weighted):
        restored = dequantize_matrix(raw, GGUF_TYPES["q4_k"], (64, 512))
        errors.append(float(((restored - weight).pow(2) * torch.from_numpy(importance)).mean()))
    assert errors[-1] < errors[-2]


def test_gguf_plan_stores_real_bytes_and_reloads_with_identical_logits(tiny, tokens, tmp_path):
    plan = _quant_plan(tiny, ["q8_0", "q4_0", "q5_1"])
    dense = tiny.model(tokens).logits
    apply_plan(tiny.model, plan)
    logits = tiny.model(tokens).logits
    assert 0 < float((logits - dense).abs().max().detach()) < 1.0
    from layerwise.ops.gguf_quant import GGUFLinear

    linears = list(decoder_linears(layerwise.load("tiny-llama").model).values())
    expected = sum(GGUF_TYPES[a.format].nbytes(m.out_features, m.in_features) for a, m in zip(plan.actions, linears))
    assert sum(m.qdata.numel() for m in tiny.model.modules() if isinstance(m, GGUFLinear)) == expected
    layerwise.save(tiny, tmp_path / "run", plan)
    reloaded = layerwise.load(str(tmp_path / "run"))
    assert torch.equal(reloaded.model(tokens).logits, logits)


def test_f32_export_runs_in_llama_cpp_with_our_logits(tiny, ids, tmp_path):
    report = export_gguf(tiny, tmp_path / "tiny.gguf", "f32")
    assert report.architecture == "llama" and report.tensor_types == {"f32": 2 + 4 * 9}
    ours = tiny.model(ids[None]).logits[0].detach()
    difference, agreement = _agreement(ours, _llama_cpp_logits(report.path, ids))
    assert difference < 1e-3 and agreement == 1.0


def test_export_says_masked_sparsity_is_stored_dense_only_when_there_is_some(tiny, tmp_path):
    assert export_gguf(tiny, tmp_path / "dense.gguf", "f16").notes == []
    with torch.no_grad():
        for module in tiny.model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight[:, ::2] = 0  # half of every linear masked
    notes = export_gguf(tiny, tmp_path / "sparse.gguf", "f16").notes
    assert len(notes) == 1 and notes[0].startswith("50.0% of the float linear weights are zero")


def test_quantized_export_is_byte_for_byte_the_plan_and_llama_cpp_agrees(ids, tmp_path):
    from gguf import GGUFReader

    loaded = _wide_llama()
    plan = _quant_plan(loaded, ["q4_k", "q6_k", "q8_0", "q3_k"])
    apply_plan(loaded.model, plan)
    report = export_gguf(loaded, tmp_path / "mixed.gguf", "f16", embedding_type="f32")
    tensors = {t.name: t for t in GGUFReader(report.path).tensors}
    gguf_q = tensors["blk.1.ffn_down.weight"]
    module = loaded.model.model.layers[1].mlp.down_proj
    assert gguf_q.tensor_type.name.lower() == module.kind.name
    assert np.array_equal(np.asarray(gguf_q.data).reshape(-1), module.qdata.numpy().reshape(-1))
    ours = loaded.model(ids[None]).logits[0].detach()
    difference, agreement = _agreement(ours, _llama_cpp_logits(report.path, ids))
    # llama.cpp rounds activations to 8 bits for its integer dot products: close, not identical
    assert agreement >= 0.95 and difference < 0.5


def test_llama_cpp_quantizer_with_our_overrides_writes_our_bytes(tmp_path):
    """The same types through llama-quantize's own per-tensor overrides (and the same importance matrix) give
    byte-identical tensors: what we evaluate in PyTorch is what llama.cpp would have made itself."""
    from gguf import GGUFReader

    from layerwise.export.gguf_export import gguf_tensor_names, rotary_rows
    from layerwise.export.llama_quantize import llama_quantize

    loaded = _wide_llama()
    names = gguf_tensor_names(loaded.model)
    source = export_gguf(loaded, tmp_path / "f32.gguf", "f32", embedding_type="f32").path
    generator = torch.Generator().manual_seed(0)
    importance = {name: torch.rand(module.in_features, generator=generator).numpy() + 0.1
                  for name, module in decoder_linears(loaded.model).items()}
    plan = _quant_plan(loaded, ["q4_k", "q5_0", "q6_k", "q2_k"], imatrix=True)
    overrides = {names[a.unit]: a.format for a in plan.actions}
    theirs = llama_quantize(source, tmp_path / "theirs.gguf", "Q8_0", {names[u]: v for u, v in importance.items()},
                            overrides)
    for action in plan.actions:
        module = loaded.model.get_submodule(action.unit)
        kind = GGUF_TYPES[action.format]
        ours = quantize_matrix(module.weight.data, kind, importance[action.unit])
        tensor = next(t for t in GGUFReader(theirs).tensors if t.name == names[action.unit])
        heads = {"attn_q": 4, "attn_k": 2}.get(tensor.name.split(".")[2])
        if heads:  # the exporter wrote these rows in llama.cpp's rotary order
            ours = ours[rotary_rows(ours.shape[0], heads)]
        assert tensor.tensor_type.name.lower() == action.format
        assert np.array_equal(np.asarray(tensor.data).reshape(ours.shape), ours)


def _shrink(loaded: layerwise.LoadedModel, removals: list[str], keep: dict[str, int] | None = None) -> None:
    from layerwise.models import get_adapter
    from layerwise.ops import remove_sublayers
    from layerwise.ops.structured import record_layer_dims, slice_attention, slice_mlp

    adapter = get_adapter(loaded.model)
    for unit, count in (keep or {}).items():
        block = int(unit.split(".")[2])
        if unit.endswith("self_attn"):
            slice_attention(adapter, block, list(range(count)))
        else:
            slice_mlp(adapter, block, list(range(count)))
    remove_sublayers(loaded.model, removals)
    record_layer_dims(loaded.model)


def test_width_pruned_export_is_deci_with_per_layer_dims_and_our_logits(tiny, ids, tmp_path):
    _shrink(tiny, [], {"model.layers.0.self_attn": 1, "model.layers.2.mlp": 96, "model.layers.3.mlp": 32})
    report = export_gguf(tiny, tmp_path / "width.gguf", "f32")
    assert report.architecture == "deci"
    assert report.layer_dims == {"head_count": [2, 4, 4, 4], "head_count_kv": [1, 2, 2, 2],
                                 "feed_forward_length": [160, 160, 96, 32]}
    difference, agreement = _agreement(tiny.model(ids[None]).logits[0].detach(), _llama_cpp_logits(report.path, ids))
    assert difference < 1e-3 and agreement == 1.0


def test_removed_sublayers_export_with_stubs_where_deci_would_drop_a_residual(tiny, ids, tmp_path, monkeypatch):
    """llama.cpp's deci graph skips a layer with FFN length 0 before adding its attention residual, and reads
    every layer's head size from layer 0: without the exporter's zero-weight stubs the file computes something
    else (first half), with them it computes exactly our model (second half)."""
    from layerwise.export import gguf_export

    _shrink(tiny, ["model.layers.0.self_attn", "model.layers.1.mlp", "model.layers.2.self_attn",
                   "model.layers.2.mlp"])
    ours = tiny.model(ids[None]).logits[0].detach()
    real_shapes = gguf_export.block_shapes

    def without_mlp_stub(adapter):
        shapes = real_shapes(adapter)
        for shape in shapes:
            if shape.mlp_stub:
                shape.ffn, shape.mlp_stub = 0, False
        return shapes

    monkeypatch.setattr(gguf_export, "block_shapes", without_mlp_stub)
    bare = export_gguf(tiny, tmp_path / "bare.gguf", "f32")
    assert _agreement(ours, _llama_cpp_logits(bare.path, ids))[0] > 0.1  # layer 1 lost its attention
    monkeypatch.setattr(gguf_export, "block_shapes", real_shapes)
    report = export_gguf(tiny, tmp_path / "depth.gguf", "f32")
    assert report.layer_dims["feed_forward_length"] == [160, 1, 0, 160]  # layer 1: the one-channel zero FFN
    assert report.layer_dims["head_count"] == [1, 4, 0, 4]  # layer 0: one zero-weight head
    assert len(report.notes) == 2
    difference, agreement = _agreement(ours, _llama_cpp_logits(report.path, ids))
    assert difference < 1e-3 and agreement == 1.0


def test_tokenizer_of_a_deci_file_reads_back(tiny, tmp_path):
    from layerwise.data.tokens import tokenizer_fingerprint
    from layerwise.gguf.tokenizer import tokenizer_from_gguf

    _shrink(tiny, ["model.layers.1.mlp"])
    path = export_gguf(tiny, tmp_path / "d.gguf", "f16").path
    restored = tokenizer_from_gguf(path)
    text = "Layer-wise compression, then llama.cpp."
    assert restored(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
    assert tokenizer_fingerprint(restored) is not None


def test_inexpressible_models_fail_before_writing(tmp_path, unadapted_dir, tiny, tokens, calibration):
    out = tmp_path / "x.gguf"
    with pytest.raises(ExportError, match="GGUF export covers the families gemma, gemma2, .*; this model is 'opt'"):
        export_gguf(layerwise.load(unadapted_dir), out)
    plan = Plan(model="tiny-llama", architecture=architecture_signature(tiny.model), budget=layerwise.Budget(),
                allocator="uniform", method="rtn",
                actions=[QuantizeAction(unit="model.layers.0.mlp.up_proj", bits=3, group_size=32)])
    apply_plan(tiny.model, plan)
    with pytest.raises(ExportError, match="own 3-bit grid"):
        export_gguf(tiny, out)
    assert not out.exists() and not list(tmp_path.glob(".x.gguf*"))


def test_cli_export_and_llama_cpp_eval(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(app, ["compress", "--model", "tiny-llama", "--structure", "quant", "--bits", "q8_0,q4_0",
                                 "--allocator", "greedy", "--avg-bits", "6", "--sensitivity", "error",
                                 "--nsamples", "4", "--seqlen", "64", "--max-windows", "2", "--no-latency",
                                 "--out", str(run)])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "result.json").read_text())
    assert record["plan"]["prediction"]["avg_bits"] <= 6.0
    out = tmp_path / "model.gguf"
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "llama" in result.output
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 2 and "already exists" in result.output
    result = runner.invoke(app, ["eval", "--model", str(out), "--engine", "llama.cpp", "--seqlen", "64",
                                 "--max-windows", "2", "--no-latency", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    evaluated = json.loads((tmp_path / "ev" / "result.json").read_text())
    assert evaluated["protocol"]["engine"] == "llama.cpp"
    assert evaluated["metrics"]["ppl"] == pytest.approx(record["metrics"]["ppl"], rel=0.05)
    assert evaluated["metrics"]["file_bytes"] == out.stat().st_size


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_broken_gguf_is_one_clear_error(tmp_path, tiny, damage):
    path = export_gguf(tiny, tmp_path / "ok.gguf", "f16").path
    broken = tmp_path / "broken.gguf"
    data = open(path, "rb").read()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a gguf file at all" * 100)
    result = runner.invoke(app, ["eval", "--model", str(broken), "--engine", "llama.cpp", "--max-windows", "1"])
    assert result.exit_code == 2
    assert "truncated" in result.output and result.output.count("\n") == 1
    from layerwise.gguf.files import check_gguf_file

    with pytest.raises(ModelNotFoundError):
        check_gguf_file(broken)


def test_max_bytes_budget_counts_the_file_as_llama_cpp_stores_it(tmp_path, calibration):
    from gguf import GGUFReader

    tiny = calibration.loaded
    from layerwise.export.gguf_export import non_linear_bytes

    fixed = non_linear_bytes(tiny.model, "q8_0")
    linears = sum(m.weight.numel() for m in decoder_linears(tiny.model).values())
    budget = fixed + int(linears * 5.0 / 8)  # room for 5 bits per weight on average
    plan = layerwise.plan(tiny, layerwise.Budget.for_bits(None, budget), method="gguf", allocator="greedy",
                          calibration=calibration, structure="quant", bits="q4_0,q5_0,q8_0", sensitivity="error")
    assert plan.prediction["gguf_tensor_bytes"] <= budget
    apply_plan(tiny.model, plan)
    report = export_gguf(tiny, tmp_path / "b.gguf", "f16", embedding_type="q8_0")
    assert report.tensor_bytes == plan.prediction["gguf_tensor_bytes"]
    assert sum(int(t.n_bytes) for t in GGUFReader(report.path).tensors) <= budget
    # below every linear at q4_0 no plan fits, and the error says the smallest budget that does
    fresh = layerwise.load("tiny-llama")
    smallest = fixed + sum(stored_type("q4_0", m.in_features).nbytes(m.out_features, m.in_features)
                           for m in decoder_linears(fresh.model).values())
    with pytest.raises(layerwise.BudgetError, match=f"below the smallest file these types reach, {smallest:,} bytes.*"
                                                    f"raise it to at least {smallest:,}"):
        layerwise.plan(fresh, layerwise.Budget.for_bits(None, smallest - 1), method="gguf", allocator="greedy",
                       calibration=calibration, structure="quant", bits="q4_0,q5_0,q8_0", sensitivity="error")


def test_levels_of_equal_size_keep_only_the_better_one():
    from layerwise.allocate.bits import pareto_levels

    cost = {"q4_0": 4.5, "q4_k": 4.5, "q5_0": 5.5, "q5_k": 5.5, "q8_0": 8.5, "f16": 16.0}
    error = {"q4_0": 0.9, "q4_k": 0.5, "q5_0": 0.2, "q5_k": 0.3, "q8_0": 0.2, "f16": 0.0}
    assert pareto_levels(cost, error) == ["q4_k", "q5_0", "f16"]  # q8_0 costs more and errs no less than q5_0


def test_greedy_over_every_gguf_type_fits_the_byte_budget(calibration):
    """All nine levels (several of equal size) on the tiny model: the allocation honours the bytes exactly as
    llama.cpp stores them, and the imatrix option weights the quantizer by the profile."""
    tiny = calibration.loaded
    from layerwise.export.gguf_export import non_linear_bytes

    linears = sum(m.weight.numel() for m in decoder_linears(tiny.model).values())
    budget = non_linear_bytes(tiny.model, "q8_0") + int(linears * 4.8 / 8)
    plan = layerwise.plan(tiny, layerwise.Budget.for_bits(None, budget), allocator="greedy", calibration=calibration,
                          structure="quant", bits="f16,q8_0,q6_k,q5_k,q5_0,q4_k,q4_0,q3_k,q2_k", imatrix=True)
    assert plan.method == "gguf" and all(a.imatrix for a in plan.actions)
    assert plan.prediction["gguf_tensor_bytes"] <= budget
    assert {a.format for a in plan.actions} <= {"f16", "q8_0", "q5_1", "q5_0", "q4_0"}  # 64/160-wide rows: no k-quants


def test_compress_export_refuses_what_gguf_cannot_express_before_writing(tmp_path, unadapted_dir):
    out = tmp_path / "run"
    result = runner.invoke(app, ["compress", "--model", unadapted_dir, "--sparsity", "0.5", "--export", "gguf",
                                 "--max-windows", "1", "--out", str(out)])
    assert result.exit_code == 2 and "this model is 'opt'" in result.output
    result = runner.invoke(app, ["compress", "--model", "tiny-llama", "--structure", "quant", "--bits", "4",
                                 "--export", "gguf", "--nsamples", "2", "--seqlen", "64", "--max-windows", "1",
                                 "--no-latency", "--out", str(out)])
    assert result.exit_code == 2 and "own 4-bit grid" in result.output
    result = runner.invoke(app, ["compress", "--model", "tiny-llama", "--export", "onnx", "--out", str(out)])
    assert result.exit_code == 2 and "supported one is gguf" in result.output
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_activation_rounding_is_llama_cpps_q8_0_and_brings_pytorch_to_llama_cpp(ids, tmp_path):
    from gguf import GGMLQuantizationType, quants

    from layerwise.gguf.activations import round_activations
    from layerwise.ops.gguf_quant import llamacpp_activations

    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(0))
    reference = quants.dequantize(quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0)
    assert torch.allclose(round_activations(x, "q4_0"), torch.from_numpy(reference), atol=1e-6)
    k_rounded = round_activations(x, "q4_k")  # q8_K: blocks of 256, f32 scale from the signed extreme
    assert (k_rounded - x).abs().max() <= x.abs().max() / 127 / 2 + 1e-6 and not torch.equal(k_rounded, x)
    assert torch.equal(round_activations(x, "f32"), x)
    loaded = _wide_llama()
    apply_plan(loaded.model, _quant_plan(loaded, ["q4_k", "q4_0", "q5_1", "q8_0"]))
    theirs = _llama_cpp_logits(export_gguf(loaded, tmp_path / "m.gguf", "f16", embedding_type="f32").path, ids)
    plain = loaded.model(ids[None]).logits[0].detach()
    with llamacpp_activations(loaded.model):
        simulated = loaded.model(ids[None]).logits[0].detach()
    # closer, not equal: llama.cpp also keeps K and V in an f16 cache, which is not simulated
    assert (simulated - theirs).abs().mean() < (plain - theirs).abs().mean()


def test_searches_can_score_with_llama_cpp_activation_rounding(calibration):
    from layerwise.allocate.bits import BitContext, sensitivities

    def context(rounding: bool) -> BitContext:
        return BitContext(calibration.loaded.model, decoder_linears(calibration.loaded.model), ["q4_0", "q8_0"], None,
                          False, calibration, activation_rounding=rounding)

    plain, rounded = sensitivities(context(False), "kl"), sensitivities(context(True), "kl")
    name = "model.layers.1.mlp.down_proj"
    assert rounded[name]["q4_0"] != plain[name]["q4_0"] and rounded[name]["q4_0"] > 0
    assert not any(m._forward_pre_hooks for m in calibration.loaded.model.modules())  # hooks removed again
    with pytest.raises(layerwise.BudgetError, match="GGUF types"):
        context(False).__class__(calibration.loaded.model, {}, [4], 32, False, calibration, activation_rounding=True)


def test_a_gguf_file_layerwise_wrote_loads_back_in_pytorch(tmp_path, isolated_cache):
    """Its tokenizer is read from the definition the export stored (transformers' own conversion panics on the
    tiny byte-level vocabulary), and its f16 weights give the model's logits back to f16 rounding."""
    tiny = layerwise.load("tiny-llama")
    path = export_gguf(tiny, tmp_path / "tiny.gguf", "f16").path
    again = layerwise.load(str(path))
    text = "Every file comes back."
    assert again.tokenizer(text)["input_ids"] == tiny.tokenizer(text)["input_ids"]
    ids = torch.tensor([tiny.tokenizer(text)["input_ids"]])
    with torch.no_grad():
        expected, got = tiny.model(ids).logits, again.model(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9
