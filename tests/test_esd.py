"""The Hill estimator recovers known power-law exponents; spectra come from the weights in float64."""

from __future__ import annotations

import pytest
import torch

from layerwise.calibration.esd import alpha_mid, alpha_peak, eigenvalues, hill_alpha


def pareto(alpha: float, n: int, seed: int = 0, xmin: float = 0.5) -> torch.Tensor:
    """Samples with density ∝ x^-alpha for x >= xmin, ascending."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (xmin * u ** (-1.0 / (alpha - 1.0))).sort().values


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
def test_hill_recovers_pareto_exponent(alpha):
    eigs = pareto(alpha, 20_000)
    assert hill_alpha(eigs, 0) == pytest.approx(alpha, rel=0.03)
    assert alpha_mid(eigs) == pytest.approx(alpha, rel=0.05)
    assert alpha_peak(eigs) == pytest.approx(alpha, rel=0.05)


def test_hill_closed_form_on_geometric_tail():
    # eigenvalues e^0, e^1, ..., e^(n-1): sum of log(x/xmin) = n(n-1)/2, so alpha = 1 + 2/(n-1)
    eigs = torch.exp(torch.arange(11, dtype=torch.float64))
    assert hill_alpha(eigs, 0) == pytest.approx(1 + 2 / 10)


def test_alpha_of_a_matrix_with_planted_spectrum():
    weight, planted = planted_matrix(3.0, 400, seed=1)
    eigs = eigenvalues(weight)
    torch.testing.assert_close(eigs, planted, rtol=1e-4, atol=1e-6)
    assert alpha_peak(eigs) == pytest.approx(3.0, rel=0.15)


def planted_matrix(alpha: float, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 1.5*size x size matrix whose WᵀW eigenvalues are exactly a Pareto(alpha) sample."""
    generator = torch.Generator().manual_seed(seed)
    planted = pareto(alpha, size, seed=seed + 10)
    u, _ = torch.linalg.qr(torch.randn(size * 3 // 2, size, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return ((u * planted.sqrt()) @ v.t()).float(), planted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_weightwatcher(seed):
    ww = pytest.importorskip("weightwatcher")
    import numpy as np

    weight, _ = planted_matrix(3.0, 400, seed)
    layer = torch.nn.Linear(400, 600, bias=False)
    layer.weight.data = weight
    details = ww.WeightWatcher(model=torch.nn.Sequential(layer)).analyze()
    assert alpha_peak(eigenvalues(weight)) == pytest.approx(float(np.asarray(details.alpha)[0]), rel=0.01)
