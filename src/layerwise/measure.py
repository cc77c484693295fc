"""Measuring a model as it is now, in PyTorch: perplexity (cached by fingerprint when asked), zero-shot scores
and latency, each only when the run settings ask for it; with wall times per step."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from .config import RunSettings
from .cost import measure_latency
from .data import load_corpus
from .evaluate import cached_perplexity, cached_zeroshot, perplexity, zeroshot
from .models import LoadedModel

Timings = dict[str, float]


@contextlib.contextmanager
def timed(timings: Timings, key: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = round(time.perf_counter() - start, 3)


def evaluate_perplexity(loaded: LoadedModel, settings: RunSettings, cached: bool) -> tuple[dict, bool]:
    corpus = load_corpus(settings.corpus, settings.eval_text, settings.calib_text)
    evaluate = cached_perplexity if cached else lambda *a: (perplexity(*a), False)
    result, was_cached = evaluate(
        loaded.model, loaded.tokenizer, corpus, settings.seqlen, settings.max_windows, settings.batch_size
    )
    return result.model_dump(), was_cached


def score_zeroshot(loaded: LoadedModel, settings: RunSettings, cached: bool) -> dict | None:
    """Zero-shot scores under ``settings.tasks`` (None when no tasks were asked for)."""
    if not settings.tasks:
        return None
    score = cached_zeroshot if cached else lambda *a: (zeroshot(*a), False)
    result, was_cached = score(
        loaded.model, loaded.tokenizer, settings.tasks, settings.task_limit, settings.seed, settings.task_batch_size
    )
    return {**result.model_dump(), "from_cache": was_cached}


def latency(loaded: LoadedModel, settings: RunSettings) -> dict | None:
    """Measured prefill/decode latency (never cached: it belongs to this machine, now)."""
    return measure_latency(loaded.model, settings.latency).model_dump() if settings.latency else None


def measure_model(loaded: LoadedModel, settings: RunSettings, timings: Timings, prefix: str, cached: bool) -> dict:
    """Perplexity, zero-shot scores and latency of the model as it is now, each when ``settings`` asks."""
    measured: dict[str, Any] = {}
    if settings.perplexity:
        with timed(timings, f"{prefix}eval_s"):
            result, was_cached = evaluate_perplexity(loaded, settings, cached)
        measured.update(ppl=result["ppl"], protocol=result["protocol"], ppl_from_cache=was_cached)
    with timed(timings, f"{prefix}zeroshot_s"):
        measured["zeroshot"] = score_zeroshot(loaded, settings, cached)
    with timed(timings, f"{prefix}latency_s"):
        measured["latency"] = latency(loaded, settings)
    return measured


def measured_speedup(dense: dict | None, compressed: dict | None) -> dict | None:
    """Measured speedup (dense time / compressed time) of the whole setting, prefill and decode."""
    if not dense or not compressed:
        return None
    decode = dense["decode_ms_per_token"], compressed["decode_ms_per_token"]
    return {
        "total": round(dense["total_ms"] / compressed["total_ms"], 4),
        "prefill": round(dense["prefill_ms"] / compressed["prefill_ms"], 4),
        "decode": round(decode[0] / decode[1], 4) if all(decode) else None,
    }
