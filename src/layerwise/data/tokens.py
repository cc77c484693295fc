"""Tokenize a split once (documents joined with a blank line) and cache the ids on disk."""

from __future__ import annotations

import hashlib

import torch
from transformers import PreTrainedTokenizerBase

from ..cache import atomic_torch_save, cache_dir, torch_load_or_none
from ..errors import DataError

DOCUMENT_SEPARATOR = "\n\n"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition, so cached ids never outlive a tokenizer change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def tokenize_documents(tokenizer: PreTrainedTokenizerBase, documents: tuple[str, ...] | list[str]) -> torch.Tensor:
    """1-D ids of the documents joined with blank lines (the tokenizer's default special tokens only)."""
    if not documents:
        raise DataError("There is no text to tokenize: the split holds no documents.")
    text = DOCUMENT_SEPARATOR.join(documents)
    key = hashlib.sha256(f"{tokenizer_fingerprint(tokenizer)}|{text}".encode()).hexdigest()[:24]
    path = cache_dir("tokens") / f"{key}.pt"
    cached = torch_load_or_none(path)
    if isinstance(cached, torch.Tensor):
        return cached
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    atomic_torch_save(ids, path)
    return ids
