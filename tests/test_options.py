"""Planning options are declared once (PlanOptions): `plan` and `compress` take the same ones, a recipe file
holds them, and every headline benchmark row's command survives the round trip through a recipe."""

from __future__ import annotations

import json
import shlex

import pytest
import typer
from benchmark_scripts import benchmark_module
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.cli_heal import heal_flag
from layerwise.config import HealSetting
from layerwise.options import PlanOptions, collect, flag_of

# compress options that evaluate, recover or export the compressed model; they do not change the plan
EVALUATION_ONLY = {"--eval-text", "--max-windows", "--batch-size", "--tasks", "--limit", "--latency", "--no-latency",
                   "--eval-speedups", "--recover-steps", "--recover-lr", "--export", "--export-type",
                   "--paired-latency", "--separate-latency", "--resume", "--iterative-steps", "--kld", "--no-kld",
                   "--reference", "--deploy-controls"}
# healing's options: compress's, and exactly the `heal` command's
HEALING = {flag for name in HealSetting.model_fields for flag in (
    heal_flag(name), *((f"--no-{heal_flag(name)[2:]}",) if HealSetting.model_fields[name].annotation is bool else ()))}
runner = CliRunner()


def _options(command: str) -> set[str]:
    click_command = typer.main.get_command(app).commands[command]
    return {flag for param in click_command.params for flag in (*param.opts, *param.secondary_opts)}


def test_plan_and_compress_take_the_same_planning_options():
    planning = {flag_of(name) for name in PlanOptions.model_fields} | {"--recipe"}
    plan, compress = _options("plan"), _options("compress")
    assert planning <= plan and planning <= compress
    assert compress - plan == EVALUATION_ONLY | HEALING
    assert plan - compress == {"--recipe-out"}
    assert HEALING <= _options("heal")


def test_the_renamed_options_no_longer_collide():
    compress = _options("compress")
    assert {"--esd-metric", "--sprint-metric", "--mp-alpha", "--mp-beta"} <= compress
    assert not {"--metric", "--alpha", "--beta"} & compress  # --alpha was both a weight and an allocator's name


def _headline_rows() -> list[str]:
    return [row for rows in benchmark_module("headline").SECTIONS.values() for row in rows]


def _parse(command: str, arguments: list[str]) -> PlanOptions:
    click_command = typer.main.get_command(app).commands[command]
    context = click_command.make_context(command, arguments, resilient_parsing=False)
    return collect(dict(context.params))


@pytest.mark.parametrize("row", _headline_rows())
def test_every_headline_row_command_round_trips_through_a_recipe(tmp_path, row):
    given = _parse("compress", shlex.split(row))
    assert given.model_dump(exclude_none=True)  # the row's options were all planning options
    recipe = tmp_path / "row.yaml"
    recipe.write_text(given.to_recipe())
    assert _parse("compress", ["--recipe", str(recipe)]) == given
    assert _parse("plan", ["--out", str(tmp_path / "p.json"), "--recipe", str(recipe)]) == given


def test_a_recipe_plans_what_its_flags_plan_and_the_command_line_overrides_it(tmp_path):
    flags = ["--method", "wanda", "--allocator", "owl", "--sparsity", "0.6", "--owl-m", "4", "--nsamples", "4",
             "--calib-seqlen", "32"]
    recipe = tmp_path / "r.yaml"
    assert runner.invoke(app, ["plan", "--model", "tiny-llama", *flags, "--out", str(tmp_path / "flags.json"),
                               "--recipe-out", str(recipe)]).exit_code == 0
    assert "owl_m: 4.0" in recipe.read_text()
    result = runner.invoke(app, ["plan", "--model", "tiny-llama", "--recipe", str(recipe), "--out",
                                 str(tmp_path / "recipe.json")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "recipe.json").read_text() == (tmp_path / "flags.json").read_text()
    result = runner.invoke(app, ["plan", "--model", "tiny-llama", "--recipe", str(recipe), "--sparsity", "0.4",
                                 "--out", str(tmp_path / "override.json")])
    assert result.exit_code == 0, result.output
    plan = json.loads((tmp_path / "override.json").read_text())
    assert plan["budget"] == {"sparsity": 0.4} and plan["allocator"] == "owl" and plan["method"] == "wanda"


@pytest.mark.parametrize(("content", "message"), [
    ("sparsty: 0.5\n", "names an unknown option 'sparsty'"),
    ("sparsity: lots\n", "invalid --sparsity: input should be a valid number"),
    ("- 0.5\n", "must be a mapping of option names to values"),
    ("sparsity: [\n", "is not valid YAML"),
    ("format: layerwise.recipe/9\n", "this version reads layerwise.recipe/1"),
    ("stages:\n  - sparsity: 0.5\n", "stage 1 must be one of prune, heal, quantize with its options"),
])
def test_a_bad_recipe_is_one_sentence_and_exit_2(tmp_path, content, message):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(content)
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["plan", "--model", "tiny-llama", "--recipe", str(recipe), "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split()) and "Traceback" not in result.output
    assert not out.exists()


def test_a_missing_recipe_is_named(tmp_path):
    result = runner.invoke(app, ["compress", "--model", "tiny-llama", "--recipe", str(tmp_path / "none.yaml"),
                                 "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "none.yaml does not exist" in " ".join(result.stderr.split())
