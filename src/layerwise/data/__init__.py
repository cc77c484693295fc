"""Packaged corpora, tokenization and calibration/evaluation windows."""

from .calibration import evaluation_windows, sample_calibration, with_bos
from .corpora import CORPORA, Corpus, load_corpus, text_file_documents
from .tokens import bos_convention, tokenize_documents, window_bos

__all__ = [
    "CORPORA",
    "Corpus",
    "evaluation_windows",
    "load_corpus",
    "sample_calibration",
    "text_file_documents",
    "tokenize_documents",
    "window_bos",
    "with_bos",
    "bos_convention",
]
