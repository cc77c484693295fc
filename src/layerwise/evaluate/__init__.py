"""Evaluation: the perplexity protocol (zero-shot and speed join here)."""

from .perplexity import PerplexityProtocol, PerplexityResult, cached_perplexity, perplexity

__all__ = ["PerplexityProtocol", "PerplexityResult", "cached_perplexity", "perplexity"]
