"""Tokenize a split once (documents joined with a blank line) and cache the ids on disk."""

from __future__ import annotations

import hashlib

import torch
from transformers import PreTrainedTokenizerBase

from ..cache import atomic_torch_save, cache_dir, torch_load_or_none
from ..errors import DataError, TokenizerError, first_line

DOCUMENT_SEPARATOR = "\n\n"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition, so cached ids never outlive a tokenizer change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids of ``text``; a tokenizer that cannot encode it (tokenizers raises a bare Exception) is a typed error."""
    try:
        return list(tokenizer(text)["input_ids"])
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exception
        raise TokenizerError(f"The tokenizer of {tokenizer.name_or_path or 'the model'} cannot encode the text: "
                             f"{first_line(exc)}.") from exc


def window_bos(tokenizer: PreTrainedTokenizerBase | None) -> int | None:
    """The BOS id every window must start with, when the tokenizer prepends one to a text (as Llama 2/3,
    Gemma, Mistral do); None when it adds none (SmolLM2, GPT-2, Qwen)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if tokenizer is None or bos is None:
        return None
    ids = encode(tokenizer, "a")
    return int(bos) if ids and ids[0] == bos else None


def bos_convention(bos: int | None) -> str:
    """The protocol's words for how windows begin (stored beside every number)."""
    if bos is None:
        return "none: the tokenizer adds no BOS, windows are plain slices of the token stream"
    return f"each window's first token replaced by BOS (id {bos}), as llama.cpp's perplexity does"


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
    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    atomic_torch_save(ids, path)
    return ids
