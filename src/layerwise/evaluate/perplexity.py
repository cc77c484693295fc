"""The one perplexity protocol: documents joined with a blank line, tokenized once, non-overlapping
windows of ``seqlen`` tokens (last partial dropped), PPL = exp(mean NLL over every predicted token)."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..cache import stable_hash
from ..data import Corpus, bos_convention, evaluation_windows, tokenize_documents, window_bos
from ..data.tokens import DOCUMENT_SEPARATOR
from .memo import memoised


class PerplexityProtocol(BaseModel):
    """Everything needed to reproduce a perplexity number; stored next to it."""

    corpus: str
    corpus_source: str
    split: str
    document_separator: str = DOCUMENT_SEPARATOR
    seqlen: int
    windows: int
    predicted_tokens: int
    dtype: str
    max_windows: int | None = None
    engine: str = "pytorch"
    bos: str = Field(bos_convention(None), description="how every window begins")


class PerplexityResult(BaseModel):
    ppl: float
    mean_nll: float
    protocol: PerplexityProtocol


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed NLL of ``ids[:, 1:]`` under ``logits[:, :-1]`` (float32), and how many tokens were predicted."""
    logits = logits[:, :-1].float()
    targets = ids[:, 1:].to(logits.device)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
    return float(nll), targets.numel()


@torch.no_grad()
def token_set_perplexity(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int) -> float:
    """exp(mean next-token NLL) of ``model`` on a fixed [n, seqlen] token set: the searches' fast proxy."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in tokens.split(batch_size):
        nll, predicted = next_token_nll(model(input_ids=batch.to(device), use_cache=False).logits, batch)
        total += nll
        count += predicted
    return math.exp(total / count)


# Summed next-token NLL of a batch of windows [n, seqlen] under some engine's model.
WindowScorer = Callable[[torch.Tensor], float]


def protocol_perplexity(score: WindowScorer, tokenizer: PreTrainedTokenizerBase, corpus: Corpus, seqlen: int,
                        max_windows: int | None, batch_size: int, split: str, dtype: str,
                        engine: str = "pytorch") -> PerplexityResult:
    """The protocol itself, for any engine: the split's windows, ``batch_size`` at a time, through ``score``."""
    ids = tokenize_documents(tokenizer, corpus.split(split))
    bos = window_bos(tokenizer)
    windows = evaluation_windows(ids, seqlen, max_windows, bos)
    total_nll = 0.0
    batches = range(0, windows.shape[0], batch_size)
    for start in tqdm(batches, desc=f"perplexity {corpus.name}/{split} ({engine})", unit="batch", disable=None,
                      leave=False):
        total_nll += score(windows[start : start + batch_size])
    predicted = windows.shape[0] * (seqlen - 1)
    mean_nll = total_nll / predicted
    protocol = PerplexityProtocol(corpus=corpus.name, corpus_source=corpus.source, split=split, seqlen=seqlen,
                                  windows=windows.shape[0], predicted_tokens=predicted, dtype=dtype,
                                  max_windows=max_windows, engine=engine, bos=bos_convention(bos))
    return PerplexityResult(ppl=math.exp(mean_nll), mean_nll=mean_nll, protocol=protocol)


@torch.no_grad()
def perplexity(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    corpus: Corpus,
    seqlen: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    split: str = "evaluation",
) -> PerplexityResult:
    """Perplexity of ``model`` on a corpus split under the protocol above (model's own dtype/device)."""
    device = next(model.parameters()).device

    def score(batch: torch.Tensor) -> float:
        batch = batch.to(device)
        return next_token_nll(model(input_ids=batch, use_cache=False).logits, batch)[0]

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return protocol_perplexity(score, tokenizer, corpus, seqlen, max_windows, batch_size, split, dtype)


# memoised per model fingerprint and protocol: (result, was_cached)
cached_perplexity = memoised("perplexity", PerplexityResult, lambda corpus, split, seqlen, max_windows, **_: [
    stable_hash(list(corpus.split(split))), corpus.name, split, seqlen, max_windows])(perplexity)
