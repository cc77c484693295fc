"""Real published text from installed packages: gensim's Wikipedia sample, treebank's PTB, user files."""

from __future__ import annotations

import bz2
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from gensim.corpora.wikicorpus import extract_pages, filter_wiki

from ..cache import atomic_write_json, cache_dir, read_json, stable_hash
from ..errors import DataError
from ..registry import Registry

SPLITS = ("calibration", "evaluation")
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_WORDS = 50


@dataclass(frozen=True)
class Corpus:
    """Documents of a corpus, split into calibration and evaluation; ``source`` says where they came from."""

    name: str
    calibration: tuple[str, ...]
    evaluation: tuple[str, ...]
    source: str

    def split(self, name: str) -> tuple[str, ...]:
        if name not in SPLITS:
            raise DataError(f"Unknown split '{name}'; choose one of: {', '.join(SPLITS)}.")
        return getattr(self, name)


CORPORA: Registry[Callable[[], Corpus]] = Registry("corpus")


def load_corpus(name: str, eval_text: str | Path | None = None, calib_text: str | Path | None = None) -> Corpus:
    """The named corpus, with its evaluation and/or calibration split replaced by user text files."""
    corpus = CORPORA.get(name)()
    if eval_text is None and calib_text is None:
        return corpus
    return Corpus(
        name=_custom_name(corpus.name, eval_text, calib_text),
        calibration=text_file_documents(calib_text) if calib_text else corpus.calibration,
        evaluation=text_file_documents(eval_text) if eval_text else corpus.evaluation,
        source=f"{corpus.source}; user files: eval={eval_text}, calib={calib_text}",
    )


def _custom_name(base: str, eval_text: str | Path | None, calib_text: str | Path | None) -> str:
    parts = [base] + [f"{k}={Path(v).name}" for k, v in (("eval", eval_text), ("calib", calib_text)) if v]
    return "+".join(parts)


def text_file_documents(path: str | Path) -> tuple[str, ...]:
    """A user text file as documents (paragraphs separated by blank lines)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"Text file {file} does not exist.")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"Text file {file} is not UTF-8 text (byte {exc.start} cannot be decoded).") from None
    documents = tuple(p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip())
    if not documents:
        raise DataError(f"Text file {file} is empty.")
    return documents


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise DataError(f"This corpus needs the Python package {pip_name}, which is not installed (pip install {pip_name}).")
    return Path(spec.origin).parent


@CORPORA.register("wiki")
def wiki_corpus() -> Corpus:
    """gensim's English Wikipedia sample: 106 articles; article i is evaluation when i % 10 == 9."""
    path = _package_dir("gensim", "gensim") / WIKI_FILE
    if not path.is_file():
        raise DataError(f"The installed gensim has no Wikipedia sample at {path}.")
    key = stable_hash([WIKI_FILE, os.path.getsize(path), WIKI_MIN_WORDS, "v1"])
    cache_file = cache_dir("corpora") / f"wiki-{key}.json"
    articles = read_json(cache_file)
    if articles is None:
        articles = _extract_wiki_articles(path)
        atomic_write_json(cache_file, articles)
    return Corpus(
        name="wiki",
        calibration=tuple(a for i, a in enumerate(articles) if i % 10 != 9),
        evaluation=tuple(a for i, a in enumerate(articles) if i % 10 == 9),
        source=f"gensim {WIKI_FILE}: extract_pages + filter_wiki, redirects and articles under "
        f"{WIKI_MIN_WORDS} words dropped; article i is evaluation when i % 10 == 9",
    )


def _extract_wiki_articles(path: Path) -> list[str]:

    articles = []
    with bz2.open(path, "rb") as handle:
        for _title, text, _page_id in extract_pages(handle):
            if text.lstrip().lower().startswith("#redirect"):
                continue
            plain = filter_wiki(text).strip()
            if len(plain.split()) >= WIKI_MIN_WORDS:
                articles.append(plain)
    return articles


@CORPORA.register("ptb")
def ptb_corpus() -> Corpus:
    """Penn Treebank LM splits from the ``treebank`` package: train for calibration, test for evaluation.

    Each split is one document with its sentences joined by a space, as the SparseGPT/Wanda code does.
    """
    _package_dir("treebank", "treebank")
    penn = importlib.import_module("treebank").penn

    def as_document(split: str) -> tuple[str, ...]:
        return (" ".join(line.strip() for line in penn[split].splitlines() if line.strip()),)

    return Corpus(
        name="ptb",
        calibration=as_document("train"),
        evaluation=as_document("test"),
        source="treebank package penn['train'] (calibration) and penn['test'] (evaluation), sentences joined by spaces",
    )
