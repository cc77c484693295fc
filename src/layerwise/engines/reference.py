"""Logits of a model named on the command line, for the KL divergence: a .gguf file runs in llama.cpp (what a
GGUF user compares against), anything else loads in PyTorch."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch

from ..config import RunSettings
from ..evaluate.kld import WindowLogits, pytorch_logits
from ..models import load
from .llamacpp import LlamaCppModel


def llamacpp_logits(model) -> WindowLogits:
    """A llama.cpp model's logits for a batch of windows, one window per evaluation."""
    def logits(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([model.logits(window) for window in batch])

    return logits


@contextlib.contextmanager
def reference_logits(spec: str, settings: RunSettings) -> Iterator[WindowLogits]:
    """The reference ``spec``'s logits function while the block runs (the llama.cpp model is closed after)."""
    if Path(spec).suffix.lower() == ".gguf":

        with LlamaCppModel(spec, settings.seqlen, settings.threads) as model:
            yield llamacpp_logits(model)
        return

    loaded = load(spec, dtype=settings.dtype, device=settings.device)
    with torch.no_grad():
        yield pytorch_logits(loaded.model)
