"""The packaged SmolLM2-135M in llama.cpp (slow): the protocol is engine-independent, exports reproduce the
source file's tensors and tokenizer, and a GGUF-typed plan on llama.cpp's fallbacks runs there."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

import layerwise
from layerwise.data import load_corpus
from layerwise.engines.llamacpp_eval import gguf_perplexity
from layerwise.evaluate import perplexity
from layerwise.export import export_gguf
from layerwise.models.loading import packaged_gguf_path

pytestmark = pytest.mark.slow
WINDOWS = 8


@pytest.fixture(scope="module")
def smollm(isolated_cache):
    return layerwise.load("smollm2-135m")


@pytest.fixture(scope="module")
def reference(smollm) -> float:
    return perplexity(smollm.model, smollm.tokenizer, load_corpus("wiki"), 512, WINDOWS).ppl


def _llama_cpp_ppl(path, smollm) -> float:
    settings = layerwise.RunSettings(max_windows=WINDOWS)
    return gguf_perplexity(path, smollm.tokenizer, load_corpus("wiki"), settings).ppl


def test_packaged_q4_1_file_in_llama_cpp_matches_our_dequantized_perplexity(smollm, reference):
    theirs = _llama_cpp_ppl(packaged_gguf_path(), smollm)
    assert theirs == pytest.approx(reference, rel=0.015)  # llama.cpp rounds activations to 8 bits: 0.8% here
    assert theirs > reference  # that rounding only costs


def test_f32_export_reproduces_the_source_tensors_and_perplexity(smollm, reference, tmp_path):
    report = export_gguf(smollm, tmp_path / "f32.gguf", "f32")
    assert report.tokenizer_from.startswith("copied from SmolLM2")
    ours = {t.name: t for t in GGUFReader(report.path).tensors}
    source = GGUFReader(packaged_gguf_path())
    from gguf import quants

    for tensor in source.tensors[:40]:  # the dequantized Q4_1 values, in llama.cpp's row order
        exported = ours[tensor.name]
        assert np.array_equal(quants.dequantize(exported.data, exported.tensor_type).reshape(-1),
                              quants.dequantize(tensor.data, tensor.tensor_type).reshape(-1))
    source_keys = {k: f.contents() for k, f in source.fields.items() if k.startswith("tokenizer.")}
    export_keys = {k: f.contents() for k, f in GGUFReader(report.path).fields.items() if k.startswith("tokenizer.")}
    assert export_keys == source_keys
    assert _llama_cpp_ppl(report.path, smollm) == pytest.approx(reference, rel=0.001)


def test_k_quant_levels_fall_back_on_576_wide_rows_and_run_in_llama_cpp(tmp_path):
    loaded = layerwise.load("smollm2-135m")
    plan = layerwise.plan(loaded, layerwise.Budget(), method="gguf", structure="quant", bits="q4_k")
    formats = {action.unit.rsplit(".", 1)[1]: action.format for action in plan.actions}
    assert formats == {"q_proj": "q5_0", "k_proj": "q5_0", "v_proj": "q5_0", "o_proj": "q5_0", "gate_proj": "q5_0",
                       "up_proj": "q5_0", "down_proj": "q4_k"}  # what llama-quantize itself would store
    layerwise.apply(loaded.model, plan)
    ours = perplexity(loaded.model, loaded.tokenizer, load_corpus("wiki"), 512, 2).ppl
    report = export_gguf(loaded, tmp_path / "q4k.gguf", embedding_type="q8_0")
    assert report.tensor_types["q4_k"] == 30 and report.tensor_types["q5_0"] == 180
    theirs = gguf_perplexity(report.path, loaded.tokenizer, load_corpus("wiki"),
                             layerwise.RunSettings(max_windows=2)).ppl
    assert theirs == pytest.approx(ours, rel=0.03)
