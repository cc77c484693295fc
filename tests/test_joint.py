"""The joint search: its costs are the exported file's, its level bank computes exactly what the backends
build, its searchers keep the budget, and Ray workers give the serial plan."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from gguf import GGUFReader
from typer.testing import CliRunner

import layerwise
from layerwise import Budget, RunSettings
from layerwise.allocate.joint import JOINT_SEARCHERS, Budgets, ScoringSetup, SerialEvaluator, build_space
from layerwise.allocate.joint.bank import LevelBank
from layerwise.allocate.joint.scoring import dense_logprobs
from layerwise.cli import app
from layerwise.errors import BudgetError
from layerwise.export.gguf_export import export_gguf, non_linear_bytes
from layerwise.ops import architecture_signature
from layerwise.structures.joint import DEFAULT_TYPES, _actions

TYPES = DEFAULT_TYPES.split(",")


def _space(loaded, max_bytes=None, target_speedup=None, latency=None, width_latency=None):
    model = loaded.model
    fixed = non_linear_bytes(model, "q8_0") - 2 * 4 * model.config.hidden_size * model.config.num_hidden_layers
    return build_space(model, TYPES, [1, 0.5], [1, 0.67, 0.33], True, Budgets(max_bytes, target_speedup), fixed,
                       latency, width_latency)


def _rankings(loaded, calibration):
    scores = calibration.width_scores("act")
    return ({b: scores.ranked_groups(b) for b in scores.groups}, {b: scores.ranked_channels(b) for b in scores.channels})


def _mixed_genome(space):
    """Block 0: attention narrowed at q4_k, MLP removed; block 1: attention removed, MLP at a third at q3_k;
    block 2: dense f16 attention, MLP two thirds at q8_0; block 3: every unit at q6_k."""
    def pick(unit, kept, kind):
        return next(i for i, level in enumerate(unit.levels) if level.kept == kept and (kept == 0 or level.kind == kind))
    units = space.units
    choice = [(1, "q4_k"), (0, None), (0, None), (64, "q3_k"), (2, "f16"), (96, "q8_0"), (2, "q6_k"), (160, "q6_k")]
    return tuple(pick(unit, kept, kind) for unit, (kept, kind) in zip(units, choice))


def test_space_levels_and_uniform_start(tiny):
    space = _space(tiny, max_bytes=150_000)
    mlp = space.units[1]
    assert [level.kept for level in mlp.levels[:: len(TYPES)]][:3] == [160, 96, 64]  # multiples of 32 blocks
    assert mlp.levels[0].kind == "f16" and mlp.levels[-1].removed
    start = space.uniform()
    assert space.fits(start) and space.bytes(start) <= 150_000
    # uniform: every unit at the same type, full width (the best-first level that fits a common fraction)
    assert len({space.units[u].levels[i] .kind for u, i in enumerate(start)}) == 1
    assert all(space.units[u].levels[i].kept == space.units[u].total for u, i in enumerate(start))
    tight = _space(tiny, max_bytes=1000)
    smallest = tight.bytes(tuple(len(unit.levels) - 1 for unit in tight.units))  # every sublayer removed
    assert smallest > tight.fixed_bytes > 1000
    with pytest.raises(BudgetError, match=f"--max-bytes 1,000 is below the smallest this model and these levels "
                                          f"reach, {smallest:,} bytes \\({tight.fixed_bytes:,} of them the token "
                                          f"embedding.*raise it to at least {smallest:,}"):
        tight.uniform()
    assert tight.bytes(tight.dense()) > smallest
    speed_only = _space(tiny, target_speedup=1.2, latency=_FakeLatency(), width_latency=_FakeWidth())
    assert {level.kind for unit in speed_only.units for level in unit.levels if not level.removed} == {"f16"}
    # predicted time: dense less the per-level savings and the removals (block 0: attention at 1 group, MLP gone)
    genome = list(speed_only.dense())
    genome[0] = next(i for i, level in enumerate(speed_only.units[0].levels) if level.kept == 1)
    genome[1] = len(speed_only.units[1].levels) - 1
    assert speed_only.milliseconds(tuple(genome)) == pytest.approx(10.0 - 0.4 - 1.5)
    assert speed_only.fits(speed_only.uniform()) and speed_only.speedup(speed_only.uniform()) >= 1.2


def test_level_latency_table_times_every_narrower_level(tiny):
    from layerwise.config import LatencySetting
    from layerwise.structures.latency_probes import measure_level_latency_table

    setting = LatencySetting(prompt_length=16, generation_length=2, repeats=1)
    table = measure_level_latency_table(tiny, {"attention": [1], "mlp": [96, 64]}, setting)
    assert set(table.saved_ms["attention"]) == {1} and set(table.saved_ms["mlp"]) == {96, 64}
    assert table.total_ms > 0 and all(v >= 0 for kind in table.saved_ms.values() for v in kind.values())


def test_bank_scores_exactly_the_model_the_backends_build(tiny, tmp_path):
    """A genome mixing removal, slices and GGUF types: the bank's model gives the logits of the plan applied to a
    fresh model, and the predicted bytes are the exported file's tensor bytes."""
    calibration = layerwise.calibration(tiny, RunSettings(nsamples=2, calib_seqlen=32))
    space = _space(tiny, max_bytes=10**7)
    groups, channels = _rankings(tiny, calibration)
    genome = _mixed_genome(space)
    bank = LevelBank(tiny.model, space, groups, channels)
    tokens = calibration.tokens()
    with torch.no_grad():
        banked = bank.assemble(genome)(tokens).logits
        bank.assemble(space.dense())
        bank.assemble(genome)  # back and forth: the swaps undo exactly
        again = bank.model(tokens).logits
    actions = _actions(tiny.model, space, genome, groups, channels, "act", None)
    assert [a.op for a in actions][:3] == ["remove", "remove", "slice"]
    assert any(a.op == "slice" and a.kept != sorted(a.kept) for a in actions)  # importance order, not sorted
    plan = layerwise.Plan(model="tiny-llama", architecture=architecture_signature(tiny.model),
                          budget=Budget.for_joint(10**7, None), allocator="evo", method="act", actions=actions)
    fresh = layerwise.load("tiny-llama")
    layerwise.apply(fresh.model, plan)
    with torch.no_grad():
        applied = fresh.model(tokens).logits
    torch.testing.assert_close(banked, applied, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, banked, rtol=0, atol=0)
    out = tmp_path / "joint.gguf"
    export_gguf(fresh, out)
    assert sum(int(t.n_bytes) for t in GGUFReader(str(out)).tensors) == space.bytes(genome)


def _evaluator(tiny, space, windows=3):
    calibration = layerwise.calibration(tiny, RunSettings(nsamples=windows, calib_seqlen=32))
    groups, channels = _rankings(tiny, calibration)
    tokens = calibration.tokens()
    setup = ScoringSetup(space, groups, channels, tokens, dense_logprobs(tiny.model, tokens, 4), (1, windows))
    return SerialEvaluator(tiny.model, setup)


@pytest.mark.parametrize("searcher", ["evo", "rl", "greedy"])
def test_searchers_keep_the_budget_and_their_evaluation_count(tiny, searcher):
    space = _space(tiny, max_bytes=90_000)
    evaluator = _evaluator(tiny, space)
    outcome = JOINT_SEARCHERS.get(searcher)(space, evaluator, 40, seed=3)
    assert space.fits(outcome.genome) and space.bytes(outcome.genome) <= 90_000
    assert evaluator.evaluations <= 40 + (1 if searcher == "greedy" else 0)
    assert outcome.score == pytest.approx(evaluator.memo[(outcome.genome, 1)])
    start = evaluator.score([space.uniform()], 1)[0]
    if searcher != "greedy":  # evo and rl keep the best they scored, the uniform start included
        assert outcome.score <= start
    again = JOINT_SEARCHERS.get(searcher)(space, _evaluator(tiny, space), 40, seed=3)
    assert again.genome == outcome.genome  # the same seed gives the same plan


def test_scores_are_kl_and_zero_for_the_dense_model(tiny):
    space = _space(tiny, max_bytes=10**7)
    evaluator = _evaluator(tiny, space)
    dense = evaluator.score([space.dense()], 1)[0]
    assert dense < 1e-4  # f16 rounding only
    removed = tuple(len(u.levels) - 1 for u in space.units)
    assert evaluator.score([removed], 1)[0] > 100 * max(dense, 1e-6)
    evaluator.score([removed, space.dense()], 1)
    assert evaluator.evaluations == 2  # memoised


def test_level_switches_move_along_one_axis(tiny):
    space = _space(tiny, max_bytes=10**7)
    mlp = space.units[1]
    index = {(level.kept, level.kind): i for i, level in enumerate(mlp.levels) if not level.removed}
    removed = len(mlp.levels) - 1
    moves = {mlp.levels[i].describe() for i in space.moves(1, index[(160, "q4_k")])}
    assert moves == {"160@q5_k", "160@q3_k", "96@q4_k", "removed"}
    assert space.cheaper_move(1, index[(160, "q4_k")]) == index[(160, "q3_k")]  # a narrower type first
    assert space.cheaper_move(1, index[(160, "q3_k")]) == index[(96, "q3_k")]  # then a narrower width
    assert space.cheaper_move(1, index[(64, "q3_k")]) == removed and space.cheaper_move(1, removed) is None
    assert space.moves(1, removed) == [index[(64, "q3_k")]]


def test_repair_only_makes_genomes_cheaper(tiny):
    space = _space(tiny, max_bytes=80_000)
    rng = random.Random(0)
    repaired = space.repair(space.dense(), rng, keep=0)
    assert space.fits(repaired) and repaired[0] == 0


def test_ray_workers_give_the_serial_plan(tiny):
    pytest.importorskip("ray")
    calibration = layerwise.calibration(tiny, RunSettings(nsamples=3, calib_seqlen=32))
    plans = [layerwise.plan(tiny, Budget.for_joint(90_000, None), structure="joint", allocator="evo", seed=1,
                            calibration=calibration, candidates=24, workers=workers) for workers in (0, 2)]
    assert plans[0].actions == plans[1].actions
    assert plans[1].details["workers"] == 2 and plans[0].details["evaluations"] == plans[1].details["evaluations"]


def _parameters(model) -> float:
    return float(sum(p.numel() for p in model.parameters()))


def _proportional_tables(loaded, setting, space, engine="pytorch", embedding_type=None):
    """Tables that predict time as the parameters alone (no fixed cost): deterministic, unlike timing
    tiny-llama, whose per-call overheads make a measured table say anything from run to run."""
    from layerwise.config import LatencySetting
    from layerwise.cost.latency_table import LatencyTable, LevelLatencyTable

    first = {kind: next(u for u in space.units if u.kind == kind) for kind in ("attention", "mlp")}
    params = {kind: unit.level_bytes(unit.levels[0]) / 2 for kind, unit in first.items()}  # f16: 2 bytes each
    saved = {kind: {level.kept: params[kind] - unit.level_bytes(level) / 2 for level in unit.levels
                    if 0 < level.kept < unit.total} for kind, unit in first.items()}
    total = _parameters(loaded.model)
    space.latency = LatencyTable(setting=LatencySetting(), total_ms=total, sublayer_ms=params,
                                 probe_removed={kind: 1 for kind in params})
    space.width_latency = LevelLatencyTable(setting=LatencySetting(), total_ms=total, saved_ms=saved)


def _proportional_speedup(reference, model, setting=None):
    """A machine whose time is the parameters alone: it measures exactly what the proportional tables predict."""
    return SimpleNamespace(speedup={"total": _parameters(reference) / _parameters(model)})


def _machine(monkeypatch, speedup) -> None:
    """The speed guard's paired PyTorch timings on a machine whose speedup is ``speedup``."""
    from layerwise.cost import latency_table

    monkeypatch.setitem(latency_table.PAIRED_LATENCY._items, "pytorch",
                        lambda reference, model, setting, outtype="f16", embedding_type=None:
                        speedup(reference.model, model.model, setting))


def test_cli_joint_compress_and_errors(tmp_path, monkeypatch):
    _machine(monkeypatch, _proportional_speedup)
    monkeypatch.setattr("layerwise.structures.joint._attach_latency_tables", _proportional_tables)
    runner = CliRunner()
    out = tmp_path / "run"
    result = runner.invoke(app, ["compress", "--model", "tiny-llama", "--structure", "joint", "--allocator", "greedy",
                                 "--max-bytes", "100000", "--target-speedup", "1.2", "--candidates", "30",
                                 "--joint-attention-widths", "1,0.5", "--max-windows", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert 1 <= record["metrics"]["evaluations"] <= 31
    assert record["metrics"]["predicted_bytes"] <= 100_000 and record["metrics"]["predicted_speedup"] >= 1.2
    assert "candidates evaluated" in result.output
    missing = runner.invoke(app, ["plan", "--model", "tiny-llama", "--structure", "joint", "--allocator", "evo",
                                  "--out", str(tmp_path / "p")])
    assert missing.exit_code != 0 and "--max-bytes and/or --target-speedup" in missing.output
    nosearcher = runner.invoke(app, ["plan", "--model", "tiny-llama", "--structure", "joint", "--max-bytes", "9",
                                     "--out", str(tmp_path / "p")])
    assert nosearcher.exit_code != 0 and "--allocator evo, rl or greedy" in nosearcher.output
    impossible = runner.invoke(app, ["plan", "--model", "tiny-llama", "--structure", "joint", "--allocator", "evo",
                                     "--max-bytes", "1000", "--out", str(tmp_path / "p")])
    assert impossible.exit_code != 0 and "No choice of levels meets the budget" in impossible.output


class _FakeLatency:
    total_ms = 10.0
    sublayer_ms = {"attention": 1.0, "mlp": 1.5}


class _FakeWidth:
    saved_ms = {"attention": {1: 0.4}, "mlp": {104: 0.3, 56: 0.5}}  # f16 only: widths in multiples of 8


def test_bytes_only_plan_with_forced_removals_reports_cleanly(tiny, tmp_path):
    """One type and full widths only: the byte budget below the all-q3_k size can only be met by removals, and a
    run without a speed budget prints its table (no predicted speedup) and exports within the budget."""
    only = build_space(tiny.model, ["q3_k"], [1], [1], True, Budgets(10**7, None), 0)
    full = only.bytes(only.dense()) + non_linear_bytes(tiny.model, "q8_0") - 2 * 4 * 64 * 4
    budget = full - 12_000
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--structure", "joint", "--allocator", "evo",
                                      "--max-bytes", str(budget), "--joint-types", "q3_k",
                                      "--joint-attention-widths", "1", "--joint-mlp-widths", "1", "--candidates", "12",
                                      "--max-windows", "2", "--export", "gguf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    assert record["metrics"]["removed_sublayers"] and record["metrics"]["predicted_speedup"] is None
    assert sum(int(t.n_bytes) for t in GGUFReader(str(out / "model.gguf")).tensors) == record["metrics"]["predicted_bytes"] <= budget


def test_speed_guard_tightens_the_budget_until_the_plan_measures_within_five_percent(tmp_path, monkeypatch):
    """A machine where removing work pays less than the tables predict: time is a fixed cost (three times the dense
    model's parameters) plus the parameters left, so a plan predicted at 1.3x measures short. The guard raises
    the predicted budget by the error and repairs the plan until it measures the target."""
    def sublinear(reference, model, setting=None):
        dense, kept = (_parameters(m) for m in (reference, model))
        return SimpleNamespace(speedup={"total": (3 * dense + dense) / (3 * dense + kept)})

    _machine(monkeypatch, sublinear)
    monkeypatch.setattr("layerwise.structures.joint._attach_latency_tables", _proportional_tables)
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--structure", "joint", "--allocator", "greedy",
                                      "--target-speedup", "1.3", "--candidates", "20", "--joint-attention-widths",
                                      "1,0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    rounds = plan["details"]["speed_guard"]
    assert rounds[0]["budget"] == 1.3 and rounds[0]["measured"] < 1.3  # predicted 1.3x, measured short
    for before, after in zip(rounds, rounds[1:]):
        assert after["budget"] == pytest.approx(before["budget"] * before["predicted"] / before["measured"], rel=1e-3)
        assert after["predicted"] >= before["budget"] * before["predicted"] / before["measured"] - 1e-3
    assert len(rounds) >= 2 and (rounds[-1]["measured"] >= 1.3 or len(rounds) == 3)
    assert plan["prediction"]["predicted_speedup"] == pytest.approx(rounds[-1]["predicted"], rel=1e-3)
    assert plan["details"]["repair_evaluations"] > 0  # the repair scored its steps
    unguarded = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--structure", "joint", "--allocator",
                                         "greedy", "--target-speedup", "1.3", "--candidates", "20",
                                         "--joint-attention-widths", "1,0.5", "--no-speed-guard", "--out",
                                         str(tmp_path / "plain.json")])
    assert unguarded.exit_code == 0, unguarded.output
    assert json.loads((tmp_path / "plain.json").read_text())["details"]["speed_guard"] == []


def test_least_damaging_repair_takes_the_cheap_steps_before_the_harmful_ones(tiny):
    """The guard's repair steps the units whose gentle step costs least damage per budget saved, as the
    evaluator measures it: here every unit of block 0 is fragile, so its units stay as they were while the
    others get cheaper; a random repair of the same genome touches them."""
    from layerwise.allocate.joint.scoring import CountingEvaluator
    from layerwise.allocate.joint.searchers import least_damaging_repair

    loose = _space(tiny, max_bytes=10**9)
    dense = loose.dense()
    budget = int(0.8 * loose.bytes(dense))
    space = _space(tiny, max_bytes=budget)
    fragile = {u for u, unit in enumerate(space.units) if unit.block == 0}

    class Damage(CountingEvaluator):
        """KL = 100 per step a fragile unit took from dense, 1 per step of any other unit."""

        def _score(self, genomes, stage):
            return [sum((100.0 if u in fragile else 1.0) * level for u, level in enumerate(genome))
                    for genome in genomes]

    evaluator = Damage(ScoringSetup(space, {}, {}, torch.zeros(2, 8, dtype=torch.long), torch.zeros(1), (1, 2)))
    repaired = least_damaging_repair(space, evaluator, dense)
    assert repaired is not None and space.fits(repaired)
    assert all(repaired[u] == dense[u] for u in fragile)
    assert any(repaired[u] != dense[u] for u in range(len(dense)) if u not in fragile)
    assert evaluator.evaluations >= len(dense)  # every unit's step scored at least once
    randomly = space.repair(dense, random.Random(0))
    assert any(randomly[u] != dense[u] for u in fragile)  # what the guard used to do
    assert least_damaging_repair(_space(tiny, max_bytes=1), evaluator, dense) is None  # nothing fits


def test_typed_latency_table_prices_each_width_and_type(tiny, memory_bound_llamacpp):
    """The llama.cpp decode table: a level is (kept, GGUF type) or removal; the dense level saves nothing; a
    narrower type saves what its bytes save on a bytes-bound machine; types the rows cannot hold fall back."""
    from layerwise.structures.latency_probes import measure_typed_level_latency_table, typed_copy

    levels = {"attention": [(2, "f16"), (2, "q8_0"), (1, "f16"), (0, "f16")], "mlp": [(160, "f16"), (64, "q4_0")]}
    table = measure_typed_level_latency_table(tiny, levels, "f16", "q8_0")
    assert table.saved_ms["attention"]["2@f16"] == 0.0 and table.saved_ms["mlp"]["160@f16"] == 0.0
    q_rows = 4 * 16 + 2 * 2 * 16  # q, k, v rows of one block (64 wide), and o's 64 rows of 64
    attention_weights = (q_rows + 64) * 64
    assert table.saved_ms["attention"]["2@q8_0"] == pytest.approx(attention_weights * (2 - 34 / 32) / 1000)
    assert table.saved_ms["attention"]["removed"] == pytest.approx(attention_weights * 2 / 1000)
    assert table.saved_ms["mlp"]["64@q4_0"] == pytest.approx((3 * 160 * 64 * 2 - 3 * 64 * 64 * 18 / 32) / 1000)
    with pytest.raises(BudgetError, match="no mlp level 96@q8_0"):
        table.saved("mlp", 96, "q8_0")
    probe = typed_copy(tiny, lambda model: None, lambda name: "q4_k")  # 64-wide rows: llama.cpp stores q5_0
    assert {m.kind.name for m in probe.model.modules() if hasattr(m, "qdata")} == {"q5_0"}
    assert not any(hasattr(m, "qdata") for m in tiny.model.modules())  # the model itself is untouched


def test_joint_plans_for_llamacpp_decode_speed_with_types(tmp_path, memory_bound_llamacpp):
    """Under a llama.cpp speed budget alone the GGUF types stay in the space (they change decode speed there),
    the typed table predicts, and the guard measures the plan's removals, slices and types the same way."""
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--structure", "joint", "--allocator", "greedy",
                                      "--target-speedup", "2.0", "--latency-engine", "llama.cpp", "--candidates",
                                      "20", "--joint-attention-widths", "1,0.5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    assert plan["prediction"]["typed_latency_table"]["engine"] == "llama.cpp"
    assert "latency_table" not in plan["prediction"]
    types = {a["format"] for a in plan["actions"] if a.get("format")}
    assert types - {"f16"}, types  # narrower types bought the speed
    guard = plan["details"]["speed_guard"]
    assert guard[0]["measured"] == pytest.approx(guard[0]["predicted"], rel=1e-4) and guard[0]["measured"] >= 2.0
    assert len(guard) == 1 and plan["prediction"]["predicted_speedup"] >= 2.0
