"""Scores of a model memoised on disk, keyed by its weights, tokenizer, dtype, BOS convention and protocol."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

from pydantic import BaseModel

from ..cache import cache_dir, cached_result, stable_hash
from ..data.tokens import tokenizer_fingerprint, window_bos
from ..models.fingerprint import model_fingerprint

R = TypeVar("R", bound=BaseModel)


def memoised(kind: str, result_type: type[R], protocol: Callable[..., list[Any]]
             ) -> Callable[[Callable[..., R]], Callable[..., tuple[R, bool]]]:
    """Turn ``score(model, tokenizer, ...)`` into its cached variant returning (result, was_cached); the key is
    the model's fingerprint, the tokenizer's, ``protocol(**arguments)``, the dtype and the BOS convention."""

    def decorate(score: Callable[..., R]) -> Callable[..., tuple[R, bool]]:
        signature = inspect.signature(score)

        @functools.wraps(score)
        def cached(*args: Any, **kwargs: Any) -> tuple[R, bool]:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            model, tokenizer = bound.arguments["model"], bound.arguments["tokenizer"]
            bos = window_bos(tokenizer)
            key = stable_hash([model_fingerprint(model), tokenizer_fingerprint(tokenizer),
                               *protocol(**bound.arguments), str(next(model.parameters()).dtype),
                               *([f"bos {bos}"] if bos is not None else [])])
            return cached_result(cache_dir(kind) / f"{key}.json", result_type, lambda: score(**bound.arguments))

        cached.__doc__ = f"``{score.__name__}`` memoised on disk per model fingerprint and protocol; returns " \
                         "(result, was_cached)."
        return cached

    return decorate
