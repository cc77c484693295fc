"""Prompt complexity features for the runtime controller, each normalised to about [0, 1].

The vector (``PROMPT_FEATURES``, in order):

==================  ==========================================================================
``length``          log(1 + tokens) / log(1 + 2048), tokens of the served model's tokenizer
``question``        1 for a question (ends in '?', or opens with a wh-word or an auxiliary)
``difficulty``      (100 − Flesch reading ease) / 100, capped to [0, 1.5]; syllables from pyphen (first 120 words)
``word_length``     mean characters per word / 10 (first 120 words)
==================  ==========================================================================

The controller's heads read the length (``heads.reward_heads``); the rest is recorded in every state, for
the reference rules of the runtime analysis. spaCy's part-of-speech shares and parse depth were dropped: no
head of the published configuration read them, and the parse was most of the decision's time.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

import pyphen

PROMPT_FEATURES = ("length", "question", "difficulty", "word_length")
QUESTION_OPENERS = {"who", "what", "when", "where", "why", "how", "which", "whose", "whom", "is", "are", "was",
                    "were", "do", "does", "did", "can", "could", "should", "would", "will", "has", "have"}
WORD = re.compile(r"[A-Za-z0-9']+")
# The reading ease is a rate, estimated on the prompt's opening at a fixed cost: the decision is allowed 1% of a
# request (a few ms), and pyphen hyphenates each new word (~10 µs), 700 of them in a passage.
READ_WORDS = 120  # the reading ease counts the syllables of at most this many


@lru_cache(maxsize=1)
def _hyphenator() -> Any | None:
    try:

        return pyphen.Pyphen(lang="en_US")
    except ImportError:
        return None


def syllables(word: str) -> int:
    """Syllables of ``word``: pyphen's hyphenation points + 1 (vowel groups without pyphen)."""
    hyphenator = _hyphenator()
    if hyphenator is not None:
        return len(hyphenator.positions(word)) + 1
    return max(1, len(re.findall(r"[aeiouy]+", word.lower())))


def flesch_reading_ease(text: str) -> float:
    """206.835 − 1.015 · words per sentence − 84.6 · syllables per word."""
    words = WORD.findall(text)
    if not words:
        return 100.0
    sentences = max(1, len(re.findall(r"[.!?]+", text)))
    return 206.835 - 1.015 * len(words) / sentences - 84.6 * sum(syllables(w) for w in words) / len(words)


def _opening(text: str, words: int) -> str:
    """The text up to its ``words``-th word."""
    for count, match in enumerate(WORD.finditer(text), start=1):
        if count == words:
            return text[: match.end()]
    return text


class PromptFeaturizer:
    """Turns a prompt into ``PROMPT_FEATURES``."""

    def __init__(self, tokenizer: Any = None) -> None:
        self.tokenizer = tokenizer
        self("Warm up the hyphenator, once.", 8)  # loading pyphen's patterns takes ~0.1 s: not in the first request

    def __call__(self, text: str, tokens: int | None = None) -> list[float]:
        """The features of ``text``; ``tokens``: its length in tokens when the caller has tokenized it already."""
        if tokens is None:
            tokens = (len(self.tokenizer(text)["input_ids"]) if self.tokenizer is not None
                      else len(WORD.findall(text)))
        opening = _opening(text, READ_WORDS)
        words = WORD.findall(opening)
        first = words[0].lower() if words else ""
        return [min(1.0, math.log1p(tokens) / math.log1p(2048)),
                float(text.rstrip().endswith("?") or first in QUESTION_OPENERS),
                min(1.5, max(0.0, (100.0 - flesch_reading_ease(opening)) / 100.0)),
                sum(len(w) for w in words) / max(1, len(words)) / 10.0]
