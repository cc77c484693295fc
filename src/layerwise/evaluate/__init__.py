"""Evaluation: the perplexity protocol and zero-shot accuracy through lm-eval."""

from .perplexity import PerplexityProtocol, PerplexityResult, cached_perplexity, perplexity
from .zeroshot import TaskScore, ZeroShotProtocol, ZeroShotResult, cached_zeroshot, headline_metric, zeroshot

__all__ = [
    "PerplexityProtocol",
    "PerplexityResult",
    "TaskScore",
    "ZeroShotProtocol",
    "ZeroShotResult",
    "cached_perplexity",
    "cached_zeroshot",
    "headline_metric",
    "perplexity",
    "zeroshot",
]
