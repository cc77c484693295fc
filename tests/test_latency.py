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
    # the spread over the runs brackets the medians (goals inside it are reported as within noise)
    low, high = report.prefill_ms_range
    assert low <= report.prefill_ms <= high
    low, high = report.decode_tokens_per_s_range
    assert low <= report.decode_tokens_per_s <= high


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
    assert report.decode_tokens_per_s_range is None and report.prefill_ms_range == (report.prefill_ms,) * 2


def test_paired_latency_alternates_runs_and_cancels_the_machines_drift(tiny, monkeypatch):
    """The machine slows by half with every run of either model: timed apart, the reference (twice the work) would
    look anything from 2x slower to 0.2x; in alternating pairs each ratio is the true 2x, and the order of runs
    is AB, BA, AB, ... so neither model always runs first."""
    import itertools

    import layerwise.cost.latency as latency
    from layerwise.cost import measure_paired_latency

    reference, model = tiny.model, type(tiny.model)(tiny.model.config)
    clock, order = itertools.count(), []

    def drifting_runs(which, setting, device):
        work = 2.0 if which is reference else 1.0
        while True:
            order.append("A" if which is reference else "B")
            slow = 1.5 ** (next(clock) // 2)  # the same for both runs of a pair
            yield 0.25 * work * slow, 0.75 * work * slow

    monkeypatch.setattr(latency, "_runs", drifting_runs)
    model.train()
    pair = measure_paired_latency(reference, model, LatencySetting(warmup=1, repeats=4, generation_length=2))
    assert pair.speedup == {"total": 2.0, "prefill": 2.0, "decode": 2.0}
    assert "".join(order) == "ABBAABBAAB"
    assert pair.reference.total_ms == pytest.approx(2 * pair.model.total_ms)
    assert pair.model.setting.repeats == 4 and model.training and not reference.training  # modes restored


def test_paired_latency_sees_a_model_that_is_slower_by_a_known_amount(tiny):
    """The copy waits 40 ms more per forward pass than the model (a few ms here): the pair must find it slower by
    at least that, prefill only (no decode steps)."""
    import copy
    import time

    from layerwise.cost import measure_paired_latency

    slower = copy.deepcopy(tiny.model)
    slower.register_forward_pre_hook(lambda module, args: time.sleep(0.04))
    setting = LatencySetting(prompt_length=16, generation_length=0, repeats=5)
    pair = measure_paired_latency(tiny.model, slower, setting)
    assert pair.model.prefill_ms >= 40  # a sleep never ends early; it may end late
    # the median of the pairs' ratios, not the difference of two medians: a busy machine may inflate a run of
    # either model, and only the pairs stay robust to that
    assert pair.speedup["prefill"] < 1.0 and pair.speedup["decode"] is None
    assert pair.speedup["total"] < 0.7 and pair.speedup["decode"] is None
    assert pair.speedup["total"] == pytest.approx(pair.speedup["prefill"], rel=0.02)  # no decode: about all prefill
    assert pair.reference.prefill_ms > 0 and pair.model.decode_ms_per_token is None


def test_a_latency_table_never_saves_more_than_the_sublayers_take(tiny):
    """Removing every sublayer cannot save more than the model takes less its embedding, norms and head (the
    floor, timed with every sublayer gone); noisy timings that claim more are scaled down and say so."""
    from layerwise.cost.latency_table import consistent_scale
    from layerwise.models import get_adapter
    from layerwise.structures.latency_probes import measure_latency_table

    assert consistent_scale(30.0, 60.0) == 1.0 and consistent_scale(0.0, 10.0) == 1.0
    assert consistent_scale(120.0, 90.0) == pytest.approx(0.75) and consistent_scale(50.0, -5.0) == 0.0
    table = measure_latency_table(tiny, LatencySetting(prompt_length=8, generation_length=2, repeats=1))
    kinds = [s.kind for s in get_adapter(tiny.model).all_sublayers()]
    assert table.floor_ms is not None and 0 <= table.floor_ms and 0 <= table.scaled <= 1.0
    # (on a busy machine the floor can even time above the whole model: then nothing is predicted to save time)
    assert table.saved_ms(kinds) <= max(table.total_ms - table.floor_ms, 0.0) + 1e-3
    if table.floor_ms > 0:  # (0: the pair removing everything saved all the dense side's time)
        assert table.predicted_speedup(kinds) <= max(table.total_ms / table.floor_ms, 1.0) * (1 + 1e-3)  # rounding


def test_latency_tables_time_each_probe_in_pairs_so_drift_cancels(tiny, monkeypatch):
    """A machine whose runs take the model's parameters in microseconds plus a drift that grows by 10 ms with
    every pair: timed apart, a probe measured later would look slower than it is; paired with the model in each
    run, every table entry is the parameters the probe removed, exactly."""
    import copy
    import itertools

    from layerwise.cost import latency_table
    from layerwise.cost.latency import paired_report
    from layerwise.models import get_adapter
    from layerwise.ops.depth import remove_sublayers
    from layerwise.structures.latency_probes import measure_latency_table, measure_level_latency_table

    clock = itertools.count()

    def seconds(model) -> float:
        return sum(p.numel() for p in model.parameters()) / 1e6

    def drifting_pairs(reference, model, setting, outtype="f16", embedding_type=None):
        runs: tuple[list, list] = ([], [])
        for _ in range(setting.repeats):
            drift = 0.01 * next(clock)
            for side, timed in zip(runs, (reference, model)):
                total = seconds(timed.model) + drift
                side.append((total / 2, total / 2))
        return paired_report(setting, runs, "drifting machine", 1)

    monkeypatch.setitem(latency_table.PAIRED_LATENCY._items, "pytorch", drifting_pairs)
    adapter = get_adapter(tiny.model)

    def removed_ms(names: list[str]) -> float:  # what the machine saves without them (their norms go too)
        probe = copy.deepcopy(tiny.model)
        remove_sublayers(probe, names)
        return 1000 * (seconds(tiny.model) - seconds(probe))

    params = {s.kind: removed_ms([s.name]) for s in adapter.all_sublayers()}  # every block alike
    table = measure_latency_table(tiny, LatencySetting(repeats=3))
    assert table.sublayer_ms == pytest.approx(params, rel=1e-4) and table.scaled == 1.0
    everything = removed_ms([s.name for s in adapter.all_sublayers()])
    assert table.total_ms - table.floor_ms == pytest.approx(everything, rel=1e-4)  # the floor's pairs drift alike
    levels = measure_level_latency_table(tiny, {"mlp": [80]}, LatencySetting(repeats=3))
    mlp = adapter.mlp(0).module
    narrowed = 1000 * 3 * (mlp.gate_proj.in_features * 80) / 1e6  # gate, up and down each lose 80 of 160
    assert levels.saved_ms["mlp"][80] == pytest.approx(narrowed, rel=1e-4)
