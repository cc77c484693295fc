"""Block-by-block calibration statistics equal a plain full forward pass, and are cached."""

from __future__ import annotations

import pytest
import torch

from layerwise.calibration import CalibrationSource, HessianAccumulator, InputStats, attach_input_stats
from layerwise.models import decoder_linears


def test_streamed_profile_matches_full_forward(tiny, calibration):
    profile = calibration.profile()
    linears = decoder_linears(tiny.model)
    stats: dict[str, InputStats] = {}
    handles = attach_input_stats(linears, stats)
    with torch.no_grad():
        tiny.model(calibration.tokens(), use_cache=False)
    for handle in handles:
        handle.remove()
    assert set(profile.units) == set(linears)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.3.mlp.down_proj"):
        assert profile.units[name].tokens == 8 * 64
        torch.testing.assert_close(profile.feature_norms(name), stats[name].feature_norms(), rtol=1e-5, atol=1e-6)
        assert profile.units[name].summary()["max_abs"] == pytest.approx(stats[name].summary()["max_abs"], rel=1e-5)


def test_profile_is_cached_per_model_and_settings(tiny, calibration, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    calibration.profile()
    assert calibration.profile_from_cache is False
    again = CalibrationSource(tiny, calibration.settings)
    again.profile()
    assert again.profile_from_cache is True
    other = CalibrationSource(tiny, calibration.settings.model_copy(update={"seed": 1}))
    other.profile()
    assert other.profile_from_cache is False


def test_input_moments():
    stats = InputStats.empty(4)
    x = torch.randn(50_000, 4, generator=torch.Generator().manual_seed(0))
    stats.update(x[:20_000])
    stats.update(x[20_000:])
    summary = stats.summary()
    assert summary["mean"] == pytest.approx(float(x.mean()), abs=1e-6)
    assert summary["std"] == pytest.approx(float(x.std()), rel=1e-3)
    assert summary["kurtosis"] == pytest.approx(3.0, abs=0.1)
    torch.testing.assert_close(stats.feature_norms(), x.double().norm(dim=0))


def test_hessian_accumulator_is_running_mean():
    x = torch.randn(3, 10, 6)
    acc = HessianAccumulator(6, torch.device("cpu"))
    for chunk in x:
        acc.update(chunk)
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(acc.hessian, 2 * flat.t() @ flat / 30, rtol=1e-5, atol=1e-6)
