"""The perplexity protocol for tokenizers that prepend BOS: every window starts with it, everywhere."""

from __future__ import annotations

import torch
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

import layerwise
from layerwise.calibration import CalibrationSource
from layerwise.data import evaluation_windows, load_corpus, tokenize_documents, window_bos
from layerwise.models.tiny import byte_tokenizer

BOS = 256  # <|endoftext|> of the byte tokenizer, used as BOS here


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny byte tokenizer, made to prepend BOS to every text as Llama's tokenizers do."""
    backend = byte_tokenizer().backend_tokenizer
    backend.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|pad|>", model_max_length=1 << 30)


def test_only_tokenizers_that_prepend_bos_get_it_in_every_window():
    assert window_bos(byte_tokenizer()) is None
    tokenizer = bos_tokenizer()
    assert tokenizer("ab")["input_ids"][0] == BOS and window_bos(tokenizer) == BOS
    ids = tokenize_documents(tokenizer, load_corpus("wiki").split("evaluation"))
    windows = evaluation_windows(ids, 64, 5, window_bos(tokenizer))
    assert (windows[:, 0] == BOS).all() and torch.equal(windows[:, 1:], ids[: 5 * 64].view(5, 64)[:, 1:])
    plain = evaluation_windows(ids, 64, 5, None)
    assert plain[1, 0] != BOS  # without the convention, later windows start mid-text


def test_protocol_calibration_and_cache_follow_the_convention(tiny):
    bos_model = layerwise.LoadedModel(model=tiny.model, tokenizer=bos_tokenizer(), spec="tiny-bos", source="test")
    settings = layerwise.RunSettings(seqlen=64, max_windows=3, nsamples=4)
    result = layerwise.evaluate(bos_model, settings)
    assert result.protocol.bos.startswith("each window's first token replaced by BOS (id 256)")
    assert layerwise.evaluate(tiny, settings).protocol.bos.startswith("none")
    calibration = CalibrationSource(bos_model, settings)
    assert (calibration.tokens()[:, 0] == BOS).all() and "BOS" in calibration.describe()["bos"]
    assert not (CalibrationSource(tiny, settings).tokens()[:, 0] == BOS).all()
    from layerwise.evaluate import cached_perplexity

    corpus = load_corpus("wiki")
    with_bos, _ = cached_perplexity(tiny.model, bos_model.tokenizer, corpus, 64, 3)
    without, _ = cached_perplexity(tiny.model, tiny.tokenizer, corpus, 64, 3)
    assert with_bos.ppl != without.ppl and with_bos.protocol.bos != without.protocol.bos
