"""Packaged corpora, tokenization and calibration/evaluation windows."""

from .calibration import evaluation_windows, sample_calibration
from .corpora import CORPORA, Corpus, load_corpus, text_file_documents
from .tokens import tokenize_documents

__all__ = [
    "CORPORA",
    "Corpus",
    "evaluation_windows",
    "load_corpus",
    "sample_calibration",
    "text_file_documents",
    "tokenize_documents",
]
