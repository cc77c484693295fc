"""KL divergence to a reference model on the perplexity protocol's windows, as ``llama-perplexity
--kl-divergence`` reports it: per predicted token KL(reference || model) of the next-token distributions, then
mean, median, 99th and 99.9th percentile and maximum, and how often both put the same token on top ("same top
p"). Window batch by window batch: only one KL value and one top-token flag per token are kept, never the
reference's logits. (llama.cpp scores the second half of each context only; ours scores every position that
predicts a token, as our perplexity does.)"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from ..cache import atomic_path
from ..data import Corpus, bos_convention, evaluation_windows, load_corpus, tokenize_documents, window_bos
from .perplexity import PerplexityProtocol

# logits [n, seqlen, vocab] of a batch of windows [n, seqlen] under some engine's model
WindowLogits = Callable[[torch.Tensor], torch.Tensor]


class KLDivergence(BaseModel):
    """KL(reference || model) per predicted token, summarised; both perplexities from the same logits."""

    mean: float
    median: float
    p99: float
    p999: float
    max: float
    same_top: float  # fraction of tokens where both models' most likely next token is the same
    tokens: int
    ppl: float
    reference_ppl: float
    reference: str
    protocol: PerplexityProtocol


def token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position KL(reference || model) (float32, natural log) and whether the top tokens agree."""
    log_p = F.log_softmax(reference_logits.float(), dim=-1)
    log_q = F.log_softmax(logits.float(), dim=-1)
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return kl.clamp_min(0.0), reference_logits.argmax(-1) == logits.argmax(-1)


def _nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum"))


@torch.no_grad()
def protocol_kld(model: WindowLogits, reference: WindowLogits, tokenizer: PreTrainedTokenizerBase, corpus: Corpus,
                 seqlen: int, max_windows: int | None, batch_size: int, reference_name: str, dtype: str,
                 engine: str = "pytorch", split: str = "evaluation") -> KLDivergence:
    """The KLD of ``model`` against ``reference`` on the perplexity protocol's windows (the same ids for both)."""
    ids = tokenize_documents(tokenizer, corpus.split(split))
    bos = window_bos(tokenizer)
    windows = evaluation_windows(ids, seqlen, max_windows, bos)
    kls, agree = [], []
    nll = reference_nll = 0.0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=f"KL divergence {corpus.name}/{split} ({engine})",
                      unit="batch", disable=None, leave=False):
        batch = windows[start : start + batch_size]
        targets = batch[:, 1:]
        ours, theirs = model(batch)[:, :-1], reference(batch)[:, :-1]
        kl, same = token_kl(theirs, ours)
        kls.append(kl.flatten().cpu())
        agree.append(same.flatten().cpu())
        nll += _nll(ours, targets.to(ours.device))
        reference_nll += _nll(theirs, targets.to(theirs.device))
    values = torch.cat(kls).double().numpy()
    tokens = int(values.size)
    protocol = PerplexityProtocol(corpus=corpus.name, corpus_source=corpus.source, split=split, seqlen=seqlen,
                                  windows=windows.shape[0], predicted_tokens=tokens, dtype=dtype,
                                  max_windows=max_windows, engine=engine, bos=bos_convention(bos))
    quantiles = np.quantile(values, [0.5, 0.99, 0.999]).tolist()  # torch.quantile refuses >16M values
    return KLDivergence(mean=float(values.mean()), median=quantiles[0], p99=quantiles[1], p999=quantiles[2],
                        max=float(values.max()), same_top=float(torch.cat(agree).float().mean()), tokens=tokens,
                        ppl=math.exp(nll / tokens), reference_ppl=math.exp(reference_nll / tokens),
                        reference=reference_name, protocol=protocol)


def pytorch_logits(model: torch.nn.Module) -> WindowLogits:
    """A PyTorch model's logits for a batch of windows, on its own device."""
    device = next(model.parameters()).device

    def logits(batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch.to(device), use_cache=False).logits

    return logits


def stored_logits(logits: WindowLogits, directory: Path) -> WindowLogits:
    """``logits`` kept on disk window by window (float32, keyed by the window's ids), so a reference that many
    files are compared with runs once (as ``llama-perplexity --kl-divergence-base`` saves it); at 512 tokens and
    SmolLM2's 49,152-token vocabulary a window takes 100 MB."""

    def cached(batch: torch.Tensor) -> torch.Tensor:
        rows = []
        for window in batch:
            key = hashlib.sha256(window.cpu().numpy().astype(np.int64).tobytes()).hexdigest()[:32]
            path = Path(directory) / f"{key}.npy"
            if path.is_file():
                rows.append(torch.from_numpy(np.load(path)))
                continue
            row = logits(window[None])[0].float().cpu()
            with atomic_path(path) as partial, partial.open("wb") as handle:
                np.save(handle, row.numpy())
            rows.append(row)
        return torch.stack(rows)

    return cached


def settings_kld(model: WindowLogits, reference: WindowLogits, tokenizer: PreTrainedTokenizerBase, settings,
                 reference_name: str, dtype: str, engine: str = "pytorch") -> KLDivergence:
    """``protocol_kld`` under a run's settings (corpus, windows, batch)."""

    corpus = load_corpus(settings.corpus, settings.eval_text, settings.calib_text)
    return protocol_kld(model, reference, tokenizer, corpus, settings.seqlen, settings.max_windows,
                        settings.batch_size, reference_name, dtype, engine)
