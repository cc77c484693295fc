"""Greedy generation for the runtime controller: a plain decode loop over a DynamicCache (so the KV-cache
profiles can evict from it between steps), timed, with the continuation scored afterwards.

Eviction keeps the first ``sink`` tokens (attention sinks) and the most recent ones, so that the cache holds
``KvEviction.keep(n)`` of the ``n`` tokens seen. Rotary positions are already inside the cached keys; each new
token gets its true position, and its cache position is the cache's current length.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers import DynamicCache

from .profiles import KvEviction


@dataclass
class Generation:
    """What one request produced and how long it took."""

    prompt_length: int
    new_tokens: list[int]
    prefill_s: float
    decode_s: float
    cache_length: int
    nll: float | None = None  # mean NLL of the forced tokens, when decoding was teacher-forced

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll) if self.nll is not None else float("nan")

    @property
    def latency_ms(self) -> float:
        """The whole request: prefill and decoding."""
        return 1000 * (self.prefill_s + self.decode_s)

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of the whole request (prefill included)."""
        return len(self.new_tokens) / max(self.latency_ms / 1000, 1e-9)


def evict(cache, policy: KvEviction, seen: int) -> None:
    """Drop the oldest non-sink entries of every layer until the cache holds ``policy.keep(seen)`` tokens."""
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        length, target = keys.shape[-2], policy.keep(seen)
        if length <= target:
            continue
        recent = target - policy.sink
        layer.keys = torch.cat([keys[..., : policy.sink, :], keys[..., length - recent :, :]], dim=-2)
        layer.values = torch.cat([layer.values[..., : policy.sink, :], layer.values[..., length - recent :, :]], dim=-2)


class TokenStream:
    """Greedy decoding one token at a time: iterate for the new tokens as they are chosen (what a streaming
    server sends), then read ``result``. With ``forced``, the loop feeds those tokens instead of its own choices
    (the same work per step) and scores their mean NLL: speed and quality of a profile in one pass."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int,
                 eviction: KvEviction | None = None, eos_token_id: int | None = None,
                 forced: list[int] | None = None) -> None:
        if input_ids.dim() != 2 or input_ids.shape[0] != 1:
            raise ValueError("generate takes one prompt: input_ids of shape [1, T].")
        self.model, self.input_ids, self.eviction = model, input_ids, eviction
        self.max_new_tokens = min(max_new_tokens, len(forced)) if forced is not None else max_new_tokens
        self.eos_token_id, self.forced = eos_token_id, forced
        self.result: Generation | None = None

    @torch.no_grad()
    def __iter__(self) -> Iterator[int]:

        model, forced = self.model, self.forced
        device = next(model.parameters()).device
        input_ids = self.input_ids.to(device)
        cache = DynamicCache()
        nll = 0.0

        def choose(logits: torch.Tensor, step: int) -> int:
            nonlocal nll
            if forced is None:
                return int(logits[0, -1].argmax())
            nll -= float(torch.log_softmax(logits[0, -1].float(), -1)[forced[step]])
            return forced[step]

        start = time.perf_counter()
        logits = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = choose(logits, 0)
        prefill = time.perf_counter() - start
        new_tokens, seen = [token], input_ids.shape[1]
        yield token
        start = time.perf_counter()
        while len(new_tokens) < self.max_new_tokens and (forced is not None or token != self.eos_token_id):
            if self.eviction is not None:
                evict(cache, self.eviction, seen)
            length = cache.get_seq_length()
            logits = model(input_ids=torch.tensor([[token]], device=device), past_key_values=cache, use_cache=True,
                           position_ids=torch.tensor([[seen]], device=device),
                           cache_position=torch.tensor([length], device=device)).logits
            token = choose(logits, len(new_tokens))
            new_tokens.append(token)
            seen += 1
            yield token
        self.result = Generation(input_ids.shape[1], new_tokens, prefill, time.perf_counter() - start,
                                 cache.get_seq_length(), nll / len(new_tokens) if forced is not None else None)


def generate(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eviction: KvEviction | None = None,
             eos_token_id: int | None = None, forced: list[int] | None = None) -> Generation:
    """Greedy continuation of ``input_ids`` [1, T] for up to ``max_new_tokens`` tokens (``TokenStream`` run to
    the end)."""
    stream = TokenStream(model, input_ids, max_new_tokens, eviction, eos_token_id, forced)
    for _ in stream:
        pass
    assert stream.result is not None
    return stream.result


@torch.no_grad()
def continuation_perplexity(model: nn.Module, prompt: torch.Tensor, continuation: list[int]) -> float:
    """Perplexity of ``continuation`` after ``prompt`` [1, T] under ``model`` (the judge: the dense model)."""
    if not continuation:
        return float("nan")
    device = next(model.parameters()).device
    ids = torch.cat([prompt.to(device), torch.tensor([continuation], device=device)], dim=1)
    logits = model(input_ids=ids).logits[0, prompt.shape[1] - 1 : -1].float()
    nll = nn.functional.cross_entropy(logits, ids[0, prompt.shape[1] :], reduction="mean")
    return math.exp(float(nll))
