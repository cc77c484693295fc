"""Measured latency: medians of real runs, per-sublayer times nested inside the model's."""

from __future__ import annotations

import pytest

from layerwise.config import LatencySetting
from layerwise.cost import measure_latency


def test_whole_model_latency_is_positive_and_consistent(tiny):
    report = measure_latency(tiny.model, LatencySetting(prompt_length=16, generation_length=4, repeats=3))
    assert report.prefill_ms > 0 and report.decode_ms_per_token > 0
    assert report.decode_tokens_per_s == pytest.approx(1000 / report.decode_ms_per_token, rel=1e-3)
    assert report.sublayers is None and report.setting.repeats == 3 and report.device == "cpu"


def test_sublayer_times_cover_every_sublayer_and_fit_inside_the_forward(tiny):
    setting = LatencySetting(prompt_length=16, generation_length=3, warmup=0, repeats=1)
    report = measure_latency(tiny.model, setting, per_sublayer=True)
    names = {f"model.layers.{i}.{kind}" for i in range(4) for kind in ("self_attn", "mlp")}
    assert set(report.sublayers) == names
    assert all(s.prefill_ms > 0 and s.decode_ms_per_token > 0 for s in report.sublayers.values())
    assert sum(s.prefill_ms for s in report.sublayers.values()) < report.prefill_ms
    assert sum(s.decode_ms_per_token for s in report.sublayers.values()) < report.decode_ms_per_token
    assert not any(module._forward_hooks or module._forward_pre_hooks for module in tiny.model.modules())


def test_no_generation_means_no_decode_figures(tiny):
    report = measure_latency(tiny.model, LatencySetting(prompt_length=8, generation_length=0, repeats=1))
    assert report.prefill_ms > 0 and report.decode_ms_per_token is None and report.decode_tokens_per_s is None
