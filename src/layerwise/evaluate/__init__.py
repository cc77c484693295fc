"""Evaluation: the perplexity protocol and zero-shot accuracy through lm-eval."""

from .perplexity import PerplexityProtocol, PerplexityResult, cached_perplexity, perplexity
from .zeroshot import TaskScore, ZeroShotProtocol, ZeroShotResult, cached_zeroshot, zeroshot

__all__ = [
    "PerplexityProtocol",
    "PerplexityResult",
    "TaskScore",
    "ZeroShotProtocol",
    "ZeroShotResult",
    "cached_perplexity",
    "cached_zeroshot",
    "perplexity",
    "zeroshot",
]
