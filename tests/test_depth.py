"""Depth pruning on tiny-llama: real removal and reload, checkpointed sensitivities, least-squares tuning,
the stopping rule, and the SLEB / ShortGPT / drop-last baselines."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import layerwise
from layerwise.allocate import DEPTH_ALLOCATORS, DepthContext
from layerwise.allocate.sprint import sensitivity
from layerwise.calibration import CalibrationSource
from layerwise.calibration.distance import mean_distance
from layerwise.calibration.sublayers import SublayerStream, checkpoint_positions
from layerwise.cli import app
from layerwise.config import Budget, LatencySetting, RunSettings
from layerwise.cost import LatencyTable
from layerwise.errors import BudgetError
from layerwise.models import get_adapter
from layerwise.ops import remove_sublayers, temporarily_removed
from layerwise.ops.tuning import (
    ProjectionStats,
    measurement_end,
    projection_error,
    refit,
    swapped_slice,
    tune_for_removal,
)

QUICK = ["--seqlen", "64", "--max-windows", "2", "--nsamples", "8", "--generation-length", "4"]


def fake_table(attention_ms: float = 5.0, mlp_ms: float = 10.0, total_ms: float = 100.0) -> LatencyTable:
    """A latency table with known numbers, so stopping decisions are exact (measured ones are noisy)."""
    return LatencyTable(setting=LatencySetting(), total_ms=total_ms,
                        sublayer_ms={"attention": attention_ms, "mlp": mlp_ms}, probe_removed={"attention": 1, "mlp": 1})


@pytest.fixture
def source(tiny):
    return CalibrationSource(tiny, RunSettings(nsamples=6, seqlen=48, calib_batch_size=3))


def _context(tiny, source, table=None) -> DepthContext:
    return DepthContext(model=tiny.model, latency=table or fake_table(), calibration=source, batch_size=3)


def test_removed_sublayers_leave_the_model_and_reload_with_identical_logits(tiny, tokens, tmp_path):
    from layerwise.ops import architecture_signature
    from layerwise.ops.depth import RemoveAction
    from layerwise.plan import Plan

    dense_params = sum(p.numel() for p in tiny.model.parameters())
    names = ["model.layers.0.self_attn", "model.layers.2.mlp", "model.layers.3.self_attn", "model.layers.3.mlp"]
    plan = Plan(model="tiny-llama", architecture=architecture_signature(tiny.model),
                budget=Budget.for_depth(remove_sublayers=4), allocator="manual", method="remove",
                actions=[RemoveAction(unit=n) for n in names])
    layerwise.apply(tiny.model, plan)
    adapter = get_adapter(tiny.model)
    attention, mlp, norm = 2 * 64 * 64 + 2 * 64 * 32, 3 * 64 * 160, 64  # q,o + k,v (2 KV heads); gate,up,down
    assert dense_params - sum(p.numel() for p in tiny.model.parameters()) == 2 * (attention + norm) + 2 * (mlp + norm)
    assert {s.name for s in adapter.all_sublayers()} == {f"model.layers.{i}.{k}" for i in range(4)
                                                           for k in ("self_attn", "mlp")} - set(names)
    logits = tiny.model(tokens).logits
    layerwise.save(tiny, tmp_path / "pruned", plan)
    reloaded = layerwise.load(str(tmp_path / "pruned"))
    assert torch.equal(reloaded.model(tokens).logits, logits)
    assert sum(p.numel() for p in reloaded.model.parameters()) == sum(p.numel() for p in tiny.model.parameters())


def test_kv_cache_generation_still_matches_full_recompute_after_removing_the_first_attention(tiny, tokens):
    remove_sublayers(tiny.model, ["model.layers.0.self_attn", "model.layers.2.self_attn"])
    prompt = tokens[:1, :8]
    cached = tiny.model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=257)
    sequence = prompt
    for _ in range(8):
        next_token = tiny.model(sequence, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(cached, sequence)


def test_temporary_removal_restores_the_same_modules(tiny, tokens):
    before = tiny.model(tokens).logits
    modules = [tiny.model.model.layers[1].mlp, tiny.model.model.layers[1].post_attention_layernorm]
    with temporarily_removed(tiny.model, ["model.layers.1.mlp"]):
        assert not torch.equal(tiny.model(tokens).logits, before)
    assert tiny.model.model.layers[1].mlp is modules[0]
    assert tiny.model.model.layers[1].post_attention_layernorm is modules[1]
    assert torch.equal(tiny.model(tokens).logits, before)


def test_removals_undone_in_any_order_leave_the_dense_model_and_its_kv_numbering(tiny, tokens):
    """Each removal is a SwapLog; undoing one while another stays (the joint level bank's case) numbers the
    attention layers left for the removal that remains, and undoing both gives back the very modules."""
    from layerwise.models import get_adapter

    adapter = get_adapter(tiny.model)
    before = tiny.model(tokens).logits
    attentions = [block.self_attn for block in tiny.model.model.layers]
    first = adapter.remove(adapter.sublayer("model.layers.0.self_attn"))
    second = adapter.remove(adapter.sublayer("model.layers.2.self_attn"))
    assert [attentions[b].layer_idx for b in (1, 3)] == [0, 1]
    first.undo()  # layer 0 back, layer 2 still removed
    assert [attentions[b].layer_idx for b in (0, 1, 3)] == [0, 1, 2]
    assert tiny.model.model.layers[0].self_attn is attentions[0]
    second.undo()
    assert [a.layer_idx for a in attentions] == [0, 1, 2, 3]
    assert all(block.self_attn is a for block, a in zip(tiny.model.model.layers, attentions))
    assert torch.equal(tiny.model(tokens).logits, before)


def test_a_swap_log_puts_back_the_very_objects_it_replaced(tiny):
    from layerwise.models.swaps import SwapLog

    attention = tiny.model.model.layers[1].self_attn
    config, weight = attention.config, attention.o_proj.weight.data
    stand_in = torch.nn.Identity()
    with SwapLog() as edits:
        edits.replace(tiny.model, "model.layers.1.mlp.down_proj", stand_in)
        edits.head_counts(attention, 2, 1)
        edits.set(attention.o_proj.weight, "data", torch.zeros_like(weight))
        assert tiny.model.model.layers[1].mlp.down_proj is stand_in
        assert attention.config is not config and attention.config.num_key_value_heads == 1
        assert float(attention.o_proj.weight.abs().sum()) == 0.0
    assert isinstance(tiny.model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert attention.config is config and attention.o_proj.weight.data_ptr() == weight.data_ptr()
    assert torch.equal(attention.o_proj.weight, weight)


def test_sublayer_stream_reproduces_the_model_forward(tiny, source):
    stream = SublayerStream(tiny.model, source.tokens(), batch_size=3, num_checkpoints=3)
    final = stream.run(stream.states_at(0), 0, stream.num_positions)
    expected = [tiny.model(batch).logits for batch in source.tokens().split(3)]
    for hidden, logits in zip(final, expected):
        torch.testing.assert_close(stream.adapter.logits(hidden), logits, rtol=1e-5, atol=1e-5)
    assert checkpoint_positions(8, 3) == [0, 3, 5] and sorted(stream.checkpoints) == [0, 3, 5]


@pytest.mark.parametrize("metric", ["l2-sentence", "l2-token", "cosine-token", "cosine-sentence"])
def test_checkpointed_sensitivity_equals_a_full_forward(tiny, source, metric):
    checkpointed = SublayerStream(tiny.model, source.tokens(), batch_size=3, num_checkpoints=4)
    unchecked = SublayerStream(tiny.model, source.tokens(), batch_size=3, num_checkpoints=1)
    for position in range(checkpointed.num_positions):
        fast = sensitivity(checkpointed, checkpointed.states_at(position), position, metric, False)
        # the full way: run from the embeddings with and without the sublayer, compare at the same point
        _, end = measurement_end(unchecked, position)
        start = unchecked.states_at(0)
        reference = unchecked.run(start, 0, end)
        pruned = unchecked.run(start, 0, end, skip={position})
        assert fast == pytest.approx(mean_distance(metric, reference, pruned), rel=1e-4, abs=1e-7)


def test_one_sweep_rescoring_equals_scoring_each_sublayer_alone(tiny, source):
    from layerwise.allocate.sprint import _rescore

    stream = SublayerStream(tiny.model, source.tokens(), batch_size=3, num_checkpoints=2)
    swept: dict[int, float] = {}
    _rescore(stream, swept, 0, "l2-token", False, 1)
    assert sorted(swept) == list(range(8))
    for position, value in swept.items():
        alone = sensitivity(stream, stream.states_at(position), position, "l2-token", False)
        assert value == pytest.approx(alone, rel=1e-4)


@pytest.mark.parametrize("direction,damping,relative,dim", [("in_channel", 0.01, True, 1),
                                                             ("out_channel", 0.0, False, 0)])
def test_least_squares_tuning_lowers_the_error_it_targets(tiny, source, direction, damping, relative, dim):
    stream = SublayerStream(tiny.model, source.tokens(), batch_size=3, num_checkpoints=2)
    position = stream.position_of("model.layers.1.self_attn")
    states = stream.states_at(position)
    fit = tune_for_removal(stream, states, position, ratio=0.25, damping=damping, direction=direction,
                           relative_damping=relative)
    down = tiny.model.model.layers[1].mlp.down_proj.weight
    assert fit["unit"] == "model.layers.1.mlp.down_proj" and fit["dim"] == dim
    assert len(fit["index"]) == round(0.25 * down.shape[dim])
    assert fit["error_after"] < 0.9 * fit["error_before"]
    # the same improvement seen directly: distance at the tuned MLP's output, before and after the swap
    untuned = sensitivity(stream, states, position, "l2-sentence", False)
    tuned = sensitivity(stream, states, position, "l2-sentence", False, fit)
    assert tuned < untuned
    with swapped_slice(fit["module"], dim, fit["index"], fit["values"]):
        assert torch.equal(down.index_select(dim, fit["index"]), fit["values"])
    assert not torch.equal(down.index_select(dim, fit["index"]), fit["values"])  # restored
    assert tune_for_removal(stream, stream.states_at(7), 7, 0.25, damping, direction, relative) is None  # no MLP after


def test_full_out_channel_refit_is_the_least_squares_optimum_and_damping_pulls_back(tiny, source):
    """SPRINT's defaults (every row, no damping) reach the unconstrained minimum of ‖Y − R − X Wᵀ‖²;
    the reference's absolute damping solves min ‖G w − b‖² + c²‖w − w⁰‖² (its stationarity holds)."""
    stats = ProjectionStats.empty(6, 4, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=generator)
    true = torch.randn(4, 6, generator=generator)
    stats.add(x, x @ true.T + 0.01 * torch.randn(50, 4, generator=generator))
    weight = torch.randn(4, 6, generator=generator)
    rows, values = refit(weight, stats, 1.0, 0.0, "out_channel", relative=False)
    assert rows.tolist() == [0, 1, 2, 3]
    best = torch.linalg.solve(stats.gram, stats.cross).T  # the normal equations' solution
    assert torch.allclose(values.double(), best, atol=1e-4)
    assert projection_error(values, stats) <= projection_error(weight, stats)
    c = 5.0
    _, damped = refit(weight, stats, 1.0, c, "out_channel", relative=False)
    w, w0 = damped.double().T, weight.double().T
    gradient = stats.gram @ (stats.gram @ w - stats.cross) + c * c * (w - w0)
    assert gradient.abs().max() < 1e-3 * (stats.gram @ stats.cross).abs().max()
    assert (damped - weight).norm() < (values - weight).norm()  # pulled towards the original weights


def test_plans_written_before_the_reference_defaults_replay_as_they_were_searched():
    from layerwise.ops.depth import TuneSpec

    old = TuneSpec.model_validate({"unit": "model.layers.2.mlp.down_proj", "ratio": 0.1, "damping": 0.01})
    assert (old.direction, old.damping_relative) == ("in_channel", True)


def test_depth_search_reports_its_progress_towards_the_budget(tiny, source):
    """The search's progress bar moves by the share of predicted time saved (or removals made), ending at 100%."""
    from layerwise.allocate.depth import RemovalSearch

    search = RemovalSearch(_context(tiny, source), Budget.for_depth(1.25))  # 20 ms of 100 to save
    try:
        assert search.progress() == 0.0
        search.record(["model.layers.0.mlp"])  # 10 ms saved: half way
        assert search.progress() == pytest.approx(0.5)
        search.record(["model.layers.1.mlp"])
        assert search.done() and search.progress() == 1.0
    finally:
        search.close()
    counted = RemovalSearch(_context(tiny, source), Budget.for_depth(None, 4))
    counted.record(["model.layers.0.self_attn"])
    assert counted.progress() == 0.25
    counted.close()


def test_depth_runs_default_to_a_calibration_a_cpu_user_can_wait_for():
    from layerwise.options import PlanOptions

    def calibration(**given):
        values = PlanOptions(**given).calibration()
        return {k: values[k] for k in ("nsamples", "calib_seqlen")}

    assert calibration(structure="depth") == {"nsamples": 8, "calib_seqlen": 256}
    assert calibration(structure="depth", nsamples=32) == {"nsamples": 32, "calib_seqlen": None}  # the user's wins
    assert calibration() == {"nsamples": 128, "calib_seqlen": None}


def test_search_stops_as_soon_as_the_predicted_target_is_met(tiny, source, tokens):
    before = tiny.model(tokens).logits
    table = fake_table(attention_ms=5.0, mlp_ms=10.0, total_ms=100.0)
    allocation = DEPTH_ALLOCATORS.get("sprint")(_context(tiny, source, table), Budget.for_depth(1.25),
                                                num_candidate_sublayers=2)
    kinds = [get_adapter(tiny.model).sublayer(n).kind for n in allocation.removed]
    assert table.predicted_speedup(kinds) >= 1.25 > table.predicted_speedup(kinds[:-1])
    assert [s.predicted_speedup for s in allocation.steps] == sorted(s.predicted_speedup for s in allocation.steps)
    assert torch.equal(tiny.model(tokens).logits, before)  # the search left the model as it found it


def test_sprint_is_latency_aware(tiny, source):
    # MLPs made nearly free to remove in latency terms: a latency-aware search should avoid them
    table = fake_table(attention_ms=20.0, mlp_ms=0.01, total_ms=100.0)
    aware = DEPTH_ALLOCATORS.get("sprint")(_context(tiny, source, table), Budget.for_depth(remove_sublayers=2),
                                           num_candidate_sublayers=0)
    assert all(name.endswith("self_attn") for name in aware.removed)


def test_unreachable_speedup_is_a_budget_error(tiny, source):
    with pytest.raises(BudgetError, match="Cannot reach speedup 5.0"):
        DEPTH_ALLOCATORS.get("drop-last")(_context(tiny, source, fake_table(1.0, 1.0, 100.0)), Budget.for_depth(5.0))


def test_block_baselines(tiny, source):
    drop = DEPTH_ALLOCATORS.get("drop-last")(_context(tiny, source), Budget.for_depth(remove_sublayers=3))
    assert drop.removed == ["model.layers.3.self_attn", "model.layers.3.mlp", "model.layers.2.self_attn",
                            "model.layers.2.mlp"]  # whole blocks: 3 sublayers round up to 2 blocks
    short = DEPTH_ALLOCATORS.get("shortgpt")(_context(tiny, source), Budget.for_depth(remove_sublayers=2))
    influence = short.details["block_influence"]
    assert short.removed == [f"model.layers.{min(influence, key=influence.get)}.{k}" for k in ("self_attn", "mlp")]


def test_sleb_removes_the_block_whose_removal_hurts_calibration_perplexity_least(tiny, source):
    allocation = DEPTH_ALLOCATORS.get("sleb")(_context(tiny, source), Budget.for_depth(remove_sublayers=2))

    @torch.no_grad()
    def ppl_without(block: int) -> float:
        with temporarily_removed(tiny.model, [f"model.layers.{block}.self_attn", f"model.layers.{block}.mlp"]):
            nll = count = 0.0
            for batch in source.tokens().split(3):
                logits = tiny.model(batch).logits[:, :-1]
                nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                             reduction="sum"))
                count += batch[:, 1:].numel()
        return math.exp(nll / count)

    brute = {block: ppl_without(block) for block in range(4)}
    first = allocation.details["sleb_trace"][0]
    assert first["block"] == min(brute, key=brute.get)
    assert first["calibration_ppl"] == pytest.approx(brute[first["block"]], rel=1e-4)


def test_depth_compress_replays_tuning_and_reloads(tmp_path):
    out = tmp_path / "sprint"
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", "--structure", "depth", "--allocator",
                                      "sprint", "--num-remove-sublayers", "3", "--eval-speedups", "1.01",
                                      "--out", str(out), "--prompt-length", "16", *QUICK])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    metrics = record["metrics"]
    assert len(metrics["removed_sublayers"]) == 3
    # the prediction is the latency table's: dense time over dense time less each removed sublayer's share
    table = record["plan"]["prediction"]["latency_table"]
    kinds = ["attention" if name.endswith("self_attn") else "mlp" for name in metrics["removed_sublayers"]]
    saved = sum(table["sublayer_ms"][kind] for kind in kinds)
    # (timings of a tiny model are noise: a remaining time at or below zero is floored at 1e-9 ms)
    expected = table["total_ms"] / max(table["total_ms"] - saved, 1e-9)
    assert metrics["predicted_speedup"] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    # the measured speedup is the paired medians' ratio of the recorded latencies' setting (tiny: timings are noise,
    # so only the bookkeeping is checked)
    assert metrics["latency"]["setting"]["prompt_length"] == 16 and metrics["speedup"]["total"] is not None
    assert any("tune" in action for action in record["plan"]["actions"])
    reloaded = CliRunner().invoke(app, ["eval", "--model", str(out), "--out", str(tmp_path / "eval"), "--seqlen", "64",
                                        "--max-windows", "2", "--no-latency"])
    assert reloaded.exit_code == 0, reloaded.output
    again = json.loads((tmp_path / "eval" / "result.json").read_text())["metrics"]
    assert again["ppl"] == pytest.approx(metrics["ppl"], rel=1e-6)
    assert again["parameters"] == metrics["parameters"] < metrics["dense"]["parameters"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--structure", "depth", "--allocator", "sprint"], "needs exactly one of --target-speedup"),
        (["--structure", "depth", "--target-speedup", "1.3"], "Depth pruning needs an allocator"),
        (["--structure", "depth", "--allocator", "sleb", "--target-speedup", "0.9"], "must exceed 1"),
        (["--structure", "depth", "--allocator", "shortgpt", "--target-speedup", "1.2", "--num-candidate-sublayers",
          "2"], "does not take --num-candidate-sublayers"),
        (["--structure", "depth", "--allocator", "sprint", "--target-speedup", "1.2", "--sprint-metric", "l1"],
         "Unknown distance metric 'l1'"),
        (["--structure", "sideways"], "Unknown structure 'sideways'"),
        (["--structure", "depth", "--allocator", "sprint", "--target-speedup", "1.2", "--prompt-length", "0"],
         "Invalid --prompt-length: input should be greater than or equal to 1"),
        (["--structure", "depth", "--allocator", "sprint", "--target-speedup", "1.2", "--speedup-iterations", "0"],
         "Invalid --speedup-iterations: input should be greater than or equal to 1"),
    ],
)
def test_depth_input_errors_are_one_sentence(tmp_path, args, message):
    result = CliRunner().invoke(app, ["compress", "--model", "tiny-llama", *args, "--out", str(tmp_path / "o"), *QUICK])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "o").exists()


def test_depth_speed_guard_plans_again_until_the_removals_measure_the_target(tmp_path, monkeypatch):
    """The same guard as the joint search's: a machine where removals pay less than the table says (time is a
    fixed cost of three times the dense parameters plus the parameters left) measures the 1.1x plan short; the
    guard raises the predicted budget by the error and plans again, up to three measurements."""
    from types import SimpleNamespace

    from layerwise.cost import latency_table

    def parameters(model) -> float:
        return float(sum(p.numel() for p in model.parameters()))

    def sublinear(reference, model, setting=None, outtype="f16", embedding_type=None):
        dense, kept = parameters(reference.model), parameters(model.model)
        return SimpleNamespace(speedup={"total": (3 * dense + dense) / (3 * dense + kept)})

    # the table: every sublayer's share of the time its parameters' share (no fixed cost)
    tiny = layerwise.load("tiny-llama")
    adapter = get_adapter(tiny.model)
    share = {kind: parameters(next(s.module for s in adapter.all_sublayers() if s.kind == kind))
             for kind in ("attention", "mlp")}
    table = fake_table(share["attention"], share["mlp"], parameters(tiny.model))
    monkeypatch.setattr("layerwise.structures.depth.measure_latency_table", lambda *a, **k: table)
    monkeypatch.setitem(latency_table.PAIRED_LATENCY._items, "pytorch", sublinear)
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--structure", "depth", "--allocator",
                                      "drop-last", "--target-speedup", "1.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    plan = json.loads(out.read_text())
    rounds = plan["details"]["speed_guard"]
    assert rounds[0]["budget"] == 1.1 and rounds[0]["predicted"] >= 1.1 > rounds[0]["measured"]
    for before, after in zip(rounds, rounds[1:]):
        assert after["budget"] == pytest.approx(before["budget"] * before["predicted"] / before["measured"], rel=1e-3)
        assert after["predicted"] >= after["budget"] - 1e-4  # planned again for the raised budget
    assert len(rounds) >= 2 and (rounds[-1]["measured"] >= 1.1 or len(rounds) == 3)
    assert len(plan["actions"]) > 1 and plan["prediction"]["speedup"] == pytest.approx(rounds[-1]["predicted"])
    unguarded = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--structure", "depth", "--allocator",
                                         "drop-last", "--target-speedup", "1.1", "--no-speed-guard", "--out",
                                         str(tmp_path / "plain.json")])
    assert unguarded.exit_code == 0, unguarded.output
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert plain["details"]["speed_guard"] == [] and len(plain["actions"]) < len(plan["actions"])
