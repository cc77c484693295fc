"""The perplexity protocol on cases with known answers."""

from __future__ import annotations

import math

import pytest
import torch

import layerwise
from layerwise.data import load_corpus
from layerwise.evaluate import cached_perplexity, perplexity


def test_uniform_predictor_has_perplexity_equal_to_vocab(tiny):
    with torch.no_grad():
        tiny.model.model.norm.weight.zero_()  # hidden state 0 -> all logits 0 -> uniform distribution
    result = perplexity(tiny.model, tiny.tokenizer, load_corpus("wiki"), seqlen=64, max_windows=3)
    assert result.ppl == pytest.approx(tiny.model.config.vocab_size, rel=1e-5)
    assert (result.protocol.windows, result.protocol.predicted_tokens) == (3, 3 * 63)


def test_matches_transformers_loss_over_windows(tiny):
    corpus = load_corpus("wiki")
    result = perplexity(tiny.model, tiny.tokenizer, corpus, seqlen=32, max_windows=5, batch_size=2)
    ids = layerwise.data.tokenize_documents(tiny.tokenizer, corpus.evaluation)[: 5 * 32].view(5, 32)
    with torch.no_grad():
        losses = [tiny.model(input_ids=w[None], labels=w[None]).loss.item() for w in ids]
    assert result.ppl == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert result.protocol.corpus == "wiki" and result.protocol.document_separator == "\n\n"


def test_cache_hit_only_for_same_weights_and_protocol(tiny):
    corpus = load_corpus("wiki")
    first, cached = cached_perplexity(tiny.model, tiny.tokenizer, corpus, seqlen=32, max_windows=2)
    again, cached_again = cached_perplexity(tiny.model, tiny.tokenizer, corpus, seqlen=32, max_windows=2)
    assert (cached, cached_again) == (False, True) and again.ppl == first.ppl
    _, other_protocol = cached_perplexity(tiny.model, tiny.tokenizer, corpus, seqlen=32, max_windows=3)
    assert other_protocol is False
    with torch.no_grad():
        tiny.model.model.layers[0].mlp.up_proj.weight.mul_(0.5)
    changed, cached_changed = cached_perplexity(tiny.model, tiny.tokenizer, corpus, seqlen=32, max_windows=2)
    assert cached_changed is False and changed.ppl != first.ppl
