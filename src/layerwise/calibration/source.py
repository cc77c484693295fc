"""CalibrationSource: the run's calibration windows and Profile, built lazily and at most once."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import torch

from ..cache import stable_hash
from ..config import RunSettings
from ..data import bos_convention, load_corpus, sample_calibration, tokenize_documents, window_bos
from ..data.tokens import tokenizer_fingerprint
from ..errors import PlanError
from ..models.fingerprint import model_fingerprint
from ..models.loading import LoadedModel
from ..plan import CalibrationRecord
from .profile import Profile, load_or_compute_profile
from .width import WIDTH_SCORERS


class CalibrationSource:
    """Calibration windows ([nsamples, seqlen]) and the Profile of the model *as it was first asked*.

    Allocators and ops share one source per run, so the profile is computed (or read from the
    cache) once, before any weight changes.
    """

    def __init__(self, loaded: LoadedModel, settings: RunSettings, expected: CalibrationRecord | None = None) -> None:
        self.loaded = loaded
        self.settings = settings
        self.expected = expected
        self._tokens: torch.Tensor | None = None
        self._profile: Profile | None = None
        self._width_scores: dict[tuple, Any] = {}
        self.profile_from_cache: bool | None = None
        self.profile_seconds: float = 0.0

    @property
    def seqlen(self) -> int:
        return self.settings.calib_seqlen or self.settings.seqlen

    def describe(self) -> dict[str, Any]:
        return {"corpus": self.settings.corpus, "calib_text": self.settings.calib_text,
                "nsamples": self.settings.nsamples, "seqlen": self.seqlen, "seed": self.settings.seed,
                "bos": bos_convention(window_bos(self.loaded.tokenizer))}

    @classmethod
    def for_plan(cls, loaded: LoadedModel, settings: RunSettings, record: CalibrationRecord) -> "CalibrationSource":
        """The calibration a plan records (corpus, windows, seed), whatever the run evaluates on; drawing
        other windows than the plan's raises ``PlanError``."""
        update = {setting: getattr(record, field) for setting, field in CalibrationRecord.SETTINGS.items()}
        return cls(loaded, settings.model_copy(update=update), expected=record)

    def record(self) -> CalibrationRecord:
        """What a plan stores about these windows, so applying it later draws exactly them."""
        description = self.describe()
        return CalibrationRecord(corpus=description["corpus"], calib_text=description["calib_text"],
                                 nsamples=description["nsamples"], seqlen=description["seqlen"],
                                 seed=description["seed"], batch_size=self.settings.calib_batch_size,
                                 bos=description["bos"], tokens=token_fingerprint(self.tokens()))

    def tokens(self) -> torch.Tensor:
        if self._tokens is None:
            corpus = load_corpus(self.settings.corpus, self.settings.eval_text, self.settings.calib_text)
            ids = tokenize_documents(self.loaded.tokenizer, corpus.calibration)
            tokens = sample_calibration(ids, self.settings.nsamples, self.seqlen, self.settings.seed,
                                        window_bos(self.loaded.tokenizer))
            if self.expected is not None and token_fingerprint(tokens) != self.expected.tokens:
                raise PlanError(f"The calibration windows drawn now ({self.expected.corpus}"
                                f"{', ' + self.expected.calib_text if self.expected.calib_text else ''}, "
                                f"{self.expected.nsamples} x {self.expected.seqlen}, seed {self.expected.seed}) "
                                "differ from those the plan was computed on: the corpus, the text file or the "
                                "tokenizer changed. Make the plan again here.")
            self._tokens = tokens
        return self._tokens

    def profile(self) -> Profile:
        if self._profile is None:
            start = time.perf_counter()
            tokens = self.tokens()
            key = {
                **self.describe(),
                "model": model_fingerprint(self.loaded.model),
                "tokenizer": tokenizer_fingerprint(self.loaded.tokenizer),
                "calibration_ids": stable_hash(tokens.tolist()),
            }
            self._profile, self.profile_from_cache = load_or_compute_profile(
                self.loaded.model, tokens, key, self.settings.calib_batch_size
            )
            self.profile_seconds = time.perf_counter() - start
        return self._profile

    def width_scores(self, method: str, **options: Any) -> Any:
        """Importance of every KV group and FFN channel by ``method`` (``WIDTH_SCORERS``), computed on the
        model as first asked and shared by the allocator and the backend of a run."""

        key = (WIDTH_SCORERS.canonical(method), tuple(sorted(options.items())))
        if key not in self._width_scores:
            self._width_scores[key] = WIDTH_SCORERS.get(method)(self.loaded.model, self, **options)
        return self._width_scores[key]


def token_fingerprint(tokens: torch.Tensor) -> str:
    """sha256 prefix of the token ids (int64, row-major) with their shape: equal windows, equal fingerprint."""
    digest = hashlib.sha256(str(tuple(tokens.shape)).encode())
    digest.update(tokens.to(torch.int64).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]
