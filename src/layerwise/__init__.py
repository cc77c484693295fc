"""layerwise: find, apply and measure per-layer compression plans for language models.

Public API: ``load``, ``plan``, ``apply``, ``evaluate``, ``zeroshot``, ``measure_latency``, ``save`` and
``compress`` (all of them).
"""

from .calibration import CalibrationSource, Profile
from .config import DEFAULT_TASK_LIMIT, Budget, LatencySetting, RunSettings
from .cost import measure_latency
from .data import load_corpus
from .errors import (
    BudgetError,
    DataError,
    LayerwiseError,
    ModelNotFoundError,
    OutputExistsError,
    PlanError,
    UnsupportedArchitectureError,
)
from .evaluate import ZeroShotResult, perplexity
from .evaluate import zeroshot as _zeroshot
from .models import LoadedModel, get_adapter, load, save
from .ops import ApplyContext, apply_plan
from .ops.unstructured import SparsifyAction
from .pipeline import compress
from .plan import Plan
from .planning import make_plan as plan
from .version import __version__  # noqa: F401


def calibration(loaded: LoadedModel, settings: RunSettings | None = None) -> CalibrationSource:
    """The calibration windows and (lazily) the Profile of ``loaded`` under ``settings``."""
    return CalibrationSource(loaded, settings or RunSettings())


def profile(loaded: LoadedModel, settings: RunSettings | None = None) -> Profile:
    """Per-linear calibration statistics of ``loaded`` (computed block by block, cached on disk)."""
    return calibration(loaded, settings).profile()


def apply(model, plan: Plan, calibration: CalibrationSource | ApplyContext | None = None):
    """Apply ``plan`` to ``model`` in place; methods that calibrate (wanda, sparsegpt, gptq) need ``calibration``."""
    return apply_plan(model, plan, calibration if isinstance(calibration, ApplyContext) else ApplyContext(calibration))


def evaluate(loaded: LoadedModel, settings: RunSettings | None = None):
    """Perplexity of a loaded model under the protocol in ``settings`` (defaults: wiki, 512-token windows)."""
    settings = settings or RunSettings()
    corpus = load_corpus(settings.corpus, settings.eval_text, settings.calib_text)
    return perplexity(loaded.model, loaded.tokenizer, corpus, settings.seqlen, settings.max_windows, settings.batch_size)


def zeroshot(
    loaded: LoadedModel, tasks: str | list[str] = "default", limit: int | None = DEFAULT_TASK_LIMIT, seed: int = 0
) -> ZeroShotResult:
    """Zero-shot accuracy of a loaded (possibly compressed) model through lm-eval; ``limit`` items per task."""
    return _zeroshot(loaded.model, loaded.tokenizer, tasks, limit, seed)


__all__ = [
    "Budget",
    "LatencySetting",
    "BudgetError",
    "DataError",
    "LayerwiseError",
    "LoadedModel",
    "ModelNotFoundError",
    "OutputExistsError",
    "Plan",
    "PlanError",
    "RunSettings",
    "SparsifyAction",
    "UnsupportedArchitectureError",
    "apply",
    "calibration",
    "compress",
    "evaluate",
    "get_adapter",
    "load",
    "measure_latency",
    "perplexity",
    "plan",
    "profile",
    "save",
    "zeroshot",
]
