"""Heavy-tailed self-regularization metrics (AlphaPruning): the power-law exponent of each weight
matrix's empirical spectral density, by the Hill estimator, in float64."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..cache import atomic_write_json, cache_dir, read_json
from ..models.fingerprint import model_fingerprint
from ..registry import Registry

SpectralMetric = Callable[[torch.Tensor], float]
SPECTRAL_METRICS: Registry[SpectralMetric] = Registry("spectral metric")
PEAK_BINS = 100


def eigenvalues(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of WᵀW (squared singular values), ascending, float64, exact zeros dropped."""
    eigs = torch.linalg.svdvals(weight.detach().to(torch.float64)).square().sort().values
    positive = eigs[eigs > 0]
    return positive if positive.numel() >= 2 else eigs.clamp_min(torch.finfo(torch.float64).tiny)


def hill_alpha(eigs: torch.Tensor, start: int) -> float:
    """Hill / maximum-likelihood power-law exponent of ``eigs[start:]`` with x_min = eigs[start]."""
    tail = eigs[start:].log()
    n = tail.numel()
    return 1.0 + n / float(tail.sum() - n * tail[0])


def ks_distance(eigs: torch.Tensor, start: int, alpha: float) -> float:
    """Kolmogorov-Smirnov distance between the tail's empirical CDF and the fitted power law."""
    tail = eigs[start:]
    n = tail.numel()
    fitted = 1.0 - (tail / tail[0]) ** (1.0 - alpha)
    empirical = torch.arange(n, dtype=torch.float64) / n
    return float((fitted - empirical).abs().max())


@SPECTRAL_METRICS.register("alpha_mid")
def alpha_mid(eigs: torch.Tensor) -> float:
    """x_min at the median eigenvalue (AlphaPruning's ``xmin_mid``)."""
    return hill_alpha(eigs, eigs.numel() // 2)


@SPECTRAL_METRICS.register("alpha_peak")
def alpha_peak(eigs: torch.Tensor) -> float:
    """x_min searched near the peak of the log-spectrum histogram, keeping the best KS fit (``xmin_peak``).

    Candidates lie in [0.95, 1.5] x the peak bin's lower edge. (The AlphaPruning repository writes the
    lower bound as log10(0.95 x peak), comparing a logarithm with an eigenvalue; we use the bound it means.)
    """
    logs = eigs.log10()
    low, high = float(logs.min()), float(logs.max())
    if high - low < 1e-12:
        return alpha_mid(eigs)
    counts = torch.histc(logs, PEAK_BINS, min=low, max=high)
    edges = torch.linspace(low, high, PEAK_BINS + 1, dtype=torch.float64)
    peak = 10 ** float(edges[int(torch.argmax(counts))])
    in_band = (eigs[:-1] >= 0.95 * peak) & (eigs[:-1] <= 1.5 * peak)
    candidates = in_band.nonzero().flatten().tolist()
    best: tuple[float, float] | None = None
    for start in candidates:
        alpha = hill_alpha(eigs, start)
        distance = ks_distance(eigs, start, alpha) if alpha > 1 else 1.0
        if best is None or distance < best[0]:
            best = (distance, alpha)
    return best[1] if best is not None else alpha_mid(eigs)


def spectral_metrics(model: nn.Module, linears: dict[str, nn.Linear], metric: str = "alpha_peak",
                     metric_cache: str | Path | None = None) -> tuple[dict[str, float], bool]:
    """The metric of every linear, cached per model fingerprint in ``metric_cache`` (or the user cache)."""
    estimator = SPECTRAL_METRICS.get(metric)
    folder = Path(metric_cache).expanduser() if metric_cache else cache_dir("esd")
    path = folder / f"{model_fingerprint(model)}-{SPECTRAL_METRICS.canonical(metric)}.json"
    stored = read_json(path)
    if isinstance(stored, dict) and set(stored) == set(linears):
        return {k: float(v) for k, v in stored.items()}, True
    values = {}
    for name, linear in tqdm(linears.items(), desc=f"spectra ({metric})", unit="matrix", disable=None, leave=False):
        value = estimator(eigenvalues(linear.weight))
        values[name] = value if math.isfinite(value) else 0.0
    atomic_write_json(path, values)
    return values, False
