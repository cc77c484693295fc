"""KL divergence to a reference, as llama-perplexity --kl-divergence reports it: exact on known distributions,
zero against itself, the same number through compress, eval --reference and the Python API, and in llama.cpp."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.data import load_corpus
from layerwise.evaluate import perplexity
from layerwise.evaluate.kld import protocol_kld, pytorch_logits, stored_logits, token_kl


def test_token_kl_is_the_reference_weighted_log_ratio_and_flags_the_top_token():
    p = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.5, 0.3, 0.2], [0.6, 0.2, 0.2]])
    kl, same = token_kl(p.log(), q.log() + 3.0)  # logits: any shift gives the same distribution
    expected = [sum(pi * math.log(pi / qi) for pi, qi in zip(row_p, row_q)) for row_p, row_q in zip(p.tolist(), q.tolist())]
    assert kl.tolist() == pytest.approx(expected, rel=1e-5)
    assert same.tolist() == [True, False]
    zero, agree = token_kl(q.log(), q.log())
    assert zero.abs().max() < 1e-6 and agree.all()


def _damaged(loaded):
    damaged = copy.deepcopy(loaded.model)
    with torch.no_grad():
        for name, parameter in damaged.named_parameters():
            if name.endswith("mlp.down_proj.weight"):
                parameter.mul_(0.3)
    return damaged


def test_protocol_kld_summarises_every_predicted_token(tiny):
    corpus = load_corpus("wiki")
    same = protocol_kld(pytorch_logits(tiny.model), pytorch_logits(tiny.model), tiny.tokenizer, corpus, 64, 3, 2,
                        "itself", "float32")
    assert same.mean == pytest.approx(0.0, abs=1e-6) and same.same_top == 1.0 and same.tokens == 3 * 63
    damaged = _damaged(tiny)
    result = protocol_kld(pytorch_logits(damaged), pytorch_logits(tiny.model), tiny.tokenizer, corpus, 64, 3, 2,
                          "dense", "float32")
    assert 0 < result.median <= result.p99 <= result.p999 <= result.max and result.mean > 0
    assert 0 < result.same_top < 1
    assert result.ppl == pytest.approx(perplexity(damaged, tiny.tokenizer, corpus, 64, 3).ppl, rel=1e-5)
    assert result.reference_ppl == pytest.approx(perplexity(tiny.model, tiny.tokenizer, corpus, 64, 3).ppl, rel=1e-5)


def test_stored_reference_logits_run_the_reference_once_and_give_the_same_kld(tiny, tmp_path):
    other = _damaged(tiny)
    corpus = load_corpus("wiki")
    calls = []

    def reference(batch):
        calls.append(batch.shape[0])
        return pytorch_logits(tiny.model)(batch)

    direct = protocol_kld(pytorch_logits(other), pytorch_logits(tiny.model), tiny.tokenizer, corpus, 64, 3, 2,
                          "dense", "float32")
    store = tmp_path / "reference"
    first, second = (protocol_kld(pytorch_logits(other), stored_logits(reference, store), tiny.tokenizer, corpus,
                                  64, 3, 2, "dense", "float32") for _ in range(2))
    assert calls == [1, 1, 1]  # three windows computed once, the second pass read them back
    assert len(list(store.glob("*.npy"))) == 3
    for measured in (first, second):
        assert measured.mean == pytest.approx(direct.mean, rel=1e-6)
        assert measured.same_top == direct.same_top and measured.tokens == direct.tokens


def test_compress_reports_kld_to_dense_and_eval_reference_gives_the_same_number(tmp_path):
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["compress", "--model", "tiny-llama", "--sparsity", "0.5", "--seqlen", "64",
                                 "--max-windows", "3", "--no-latency", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "same top token" in result.output
    kld = json.loads((out / "result.json").read_text())["metrics"]["kld"]
    assert kld["reference"] == "dense" and kld["mean"] > 0 and kld["tokens"] == 3 * 63
    again = runner.invoke(app, ["eval", "--model", str(out), "--reference", "tiny-llama", "--seqlen", "64",
                                "--max-windows", "3", "--no-latency", "--out", str(tmp_path / "eval")])
    assert again.exit_code == 0, again.output
    evaluated = json.loads((tmp_path / "eval" / "result.json").read_text())["metrics"]["kld"]
    assert evaluated["mean"] == pytest.approx(kld["mean"], rel=1e-5)
    assert evaluated["p999"] == pytest.approx(kld["p999"], rel=1e-5)
    alone = runner.invoke(app, ["eval", "--model", str(out), "--seqlen", "64", "--max-windows", "3", "--no-latency",
                                "--out", str(tmp_path / "alone")])
    assert alone.exit_code == 0 and json.loads((tmp_path / "alone" / "result.json").read_text())["metrics"]["kld"] is None
    off = runner.invoke(app, ["compress", "--model", "tiny-llama", "--sparsity", "0.5", "--seqlen", "64",
                              "--max-windows", "2", "--no-latency", "--no-kld", "--out", str(tmp_path / "off")])
    assert off.exit_code == 0 and json.loads((tmp_path / "off" / "result.json").read_text())["metrics"]["kld"] is None


def test_llamacpp_kld_against_a_gguf_reference(tiny, tmp_path):
    """A GGUF file against itself in llama.cpp: nothing diverges; a q4_0 file against the f32 one does."""
    from layerwise.export import export_gguf
    from layerwise.export.llama_quantize import llama_quantize

    f32 = export_gguf(tiny, tmp_path / "f32.gguf", "f32").path
    quantized = tmp_path / "q8.gguf"
    llama_quantize(f32, quantized, "Q8_0", None)
    runner = CliRunner()
    for model, out in ((f32, "same"), (quantized, "q8")):
        result = runner.invoke(app, ["eval", "--model", str(model), "--engine", "llama.cpp", "--reference", str(f32),
                                     "--seqlen", "64", "--max-windows", "2", "--no-latency", "--out",
                                     str(tmp_path / out)])
        assert result.exit_code == 0, result.output
    same = json.loads((tmp_path / "same" / "result.json").read_text())["metrics"]["kld"]
    assert same["mean"] == pytest.approx(0.0, abs=1e-6) and same["same_top"] == 1.0
    q8 = json.loads((tmp_path / "q8" / "result.json").read_text())["metrics"]["kld"]
    assert q8["mean"] > 1e-7 and q8["protocol"]["engine"] == "llama.cpp"
