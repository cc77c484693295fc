"""The CLI end to end on tiny-llama, and every bad-input case: one sentence, exit code 2, no partial output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerwise.cli import app

QUICK = ["--seqlen", "64", "--max-windows", "2", "--no-latency"]  # latency: test_report, test_latency
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args))


def leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_compress_writes_result_and_model(tmp_path):
    out = tmp_path / "run"
    result = invoke("compress", "--model", "tiny-llama", "--sparsity", "0.5", "--out", str(out), *QUICK)
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.stdout and "50.00%" in result.stdout
    record = json.loads((out / "result.json").read_text())
    metrics = record["metrics"]
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert metrics["dense_ppl"] > 1 and metrics["ppl"] > 1
    assert record["protocol"]["windows"] == 2 and record["protocol"]["seqlen"] == 64
    assert record["seed"] == 0 and record["versions"]["torch"]
    assert {"load_s", "dense_eval_s", "apply_s", "eval_s", "save_s", "total_s"} <= set(record["timings"])
    assert record["plan"]["budget"] == {"sparsity": 0.5}
    assert (out / "model.safetensors").is_file() and (out / "plan.json").is_file()
    assert leftovers(tmp_path) == []

    # dense perplexity is reused from the cache on the next run
    again = invoke("compress", "--model", "tiny-llama", "--sparsity", "0.7", "--out", str(out), "--overwrite", *QUICK)
    assert again.exit_code == 0, again.output
    second = json.loads((out / "result.json").read_text())["metrics"]
    assert second["dense"]["ppl_from_cache"] is True and second["dense_ppl"] == metrics["dense_ppl"]
    assert second["sparsity"] == pytest.approx(0.7, abs=1 / 172_032)  # exact to one weight


def test_eval_of_saved_directory_reproduces_ppl(tmp_path):
    out = tmp_path / "run"
    assert invoke("compress", "--model", "tiny-llama", "--out", str(out), *QUICK).exit_code == 0
    compressed_ppl = json.loads((out / "result.json").read_text())["metrics"]["ppl"]
    result = invoke("eval", "--model", str(out), "--out", str(tmp_path / "eval"), *QUICK)
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "eval" / "result.json").read_text())
    assert record["metrics"]["ppl"] == pytest.approx(compressed_ppl, rel=1e-6)
    assert record["metrics"]["sparsity"] == pytest.approx(0.5, abs=1e-6)


def test_plan_then_apply_equals_compress(tmp_path):
    plan_file = tmp_path / "plan.json"
    assert invoke("plan", "--model", "tiny-llama", "--sparsity", "0.4", "--out", str(plan_file)).exit_code == 0
    result = invoke("apply", "--model", "tiny-llama", "--plan", str(plan_file), "--out", str(tmp_path / "a"), *QUICK)
    assert result.exit_code == 0, result.output
    applied = json.loads((tmp_path / "a" / "result.json").read_text())
    invoke("compress", "--model", "tiny-llama", "--sparsity", "0.4", "--out", str(tmp_path / "c"), *QUICK)
    compressed = json.loads((tmp_path / "c" / "result.json").read_text())
    assert applied["metrics"]["ppl"] == compressed["metrics"]["ppl"]
    assert applied["plan"]["actions"] == compressed["plan"]["actions"]


def _mismatched_plan(tmp_path: Path, neox_dir: str) -> list[str]:
    plan_file = tmp_path / "plan.json"
    invoke("plan", "--model", "tiny-llama", "--out", str(plan_file))
    return ["apply", "--model", neox_dir, "--plan", str(plan_file)]


def _malformed_plan(tmp_path: Path, neox_dir: str) -> list[str]:
    plan_file = tmp_path / "bad.json"
    plan_file.write_text('{"actions": [}')
    return ["apply", "--model", "tiny-llama", "--plan", str(plan_file)]


ERROR_CASES = {
    "unknown model": (lambda p, neox: ["compress", "--model", "gpt-7"], "Cannot load model 'gpt-7': it is not a named model"),
    "missing path": (lambda p, neox: ["eval", "--model", str(p / "nowhere")], "no file or directory exists at that path"),
    "sparsity 1": (lambda p, neox: ["compress", "--model", "tiny-llama", "--sparsity", "1.0"], "Sparsity must lie in [0, 1)"),
    "negative sparsity": (lambda p, neox: ["compress", "--model", "tiny-llama", "--sparsity", "-0.2"], "Sparsity must lie"),
    "malformed plan": (_malformed_plan, "is not valid JSON"),
    "mismatched plan": (_mismatched_plan, "The plan was made for a model with model_type=llama"),
    "missing plan": (lambda p, neox: ["apply", "--model", "tiny-llama", "--plan", str(p / "none.json")], "does not exist"),
    "missing data": (lambda p, neox: ["compress", "--model", "tiny-llama", "--eval-text", str(p / "no.txt")], "does not exist"),
    "unknown method": (lambda p, neox: ["compress", "--model", "tiny-llama", "--method", "psychic"], "Unknown sparsity method"),
    "unknown allocator": (lambda p, neox: ["compress", "--model", "tiny-llama", "--allocator", "zeal"], "Unknown allocator 'zeal'"),
    "foreign option": (lambda p, neox: ["compress", "--model", "tiny-llama", "--owl-m", "3"], "does not take --owl-m"),
    "bad N:M": (lambda p, neox: ["compress", "--model", "tiny-llama", "--nm", "4:2"], "needs 0 < N < M"),
    "unknown task": (lambda p, neox: ["compress", "--model", "tiny-llama", "--tasks", "piqa,mmlu_pro"],
                     "Unknown zero-shot task 'mmlu_pro'"),
    "negative limit": (lambda p, neox: ["eval", "--model", "tiny-llama", "--tasks", "piqa", "--limit", "-3"],
                       "Invalid --limit: input should be greater than or equal to 1"),
    "no calibration windows": (lambda p, neox: ["compress", "--model", "tiny-llama", "--nsamples", "0"],
                               "Invalid --nsamples: input should be greater than or equal to 1"),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_input_exits_2_with_one_sentence_and_no_output(tmp_path, neox_dir, case):
    build, message = ERROR_CASES[case]
    out = tmp_path / "out"
    result = invoke(*build(tmp_path, neox_dir), "--out", str(out), *QUICK)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert not out.exists() and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = invoke("compress", "--model", "tiny-llama", "--out", str(out), *QUICK)
    assert result.exit_code == 2
    assert "already exists; pass --overwrite" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failure_after_work_leaves_no_partial_directory(tmp_path, monkeypatch):
    import layerwise.pipeline as pipeline
    from layerwise.errors import OutputExistsError

    def broken_save(*args, **kwargs):
        raise OutputExistsError("simulated failure while saving.")

    monkeypatch.setattr(pipeline, "save", broken_save)
    out = tmp_path / "out"
    result = invoke("compress", "--model", "tiny-llama", "--out", str(out), *QUICK)
    assert result.exit_code == 2 and "simulated failure" in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_alpha_run_records_layer_sparsity_and_metric_then_reports(tmp_path):
    out = tmp_path / "alpha"
    result = invoke("compress", "--model", "tiny-llama", "--method", "wanda", "--allocator", "alpha", "--sparsity",
                    "0.6", "--epsilon", "0.1", "--esd-metric", "alpha_mid", "--metric-cache", str(tmp_path / "esd"),
                    "--nsamples", "4", "--out", str(out), *QUICK)
    assert result.exit_code == 0, result.output
    record = json.loads((out / "result.json").read_text())
    details = record["plan"]["details"]
    assert len(details["block_metric"]) == 4 and len(details["block_sparsity"]) == 4
    assert record["plan"]["allocator_params"] == {"epsilon": 0.1, "metric": "alpha_mid",
                                                  "metric_cache": str(tmp_path / "esd")}
    assert len(record["metrics"]["per_unit_sparsity"]) == 28
    assert record["calibration"]["nsamples"] == 4 and record["calibration"]["seqlen"] == 64
    assert len(list((tmp_path / "esd").glob("*-alpha_mid.json"))) == 1

    report = invoke("report", str(out), "--format", "png")
    assert report.exit_code == 0, report.output
    png = (out / "allocation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_sparsegpt_nm_plan_applies_through_cli(tmp_path):
    plan_file = tmp_path / "plan.json"
    made = invoke("plan", "--model", "tiny-llama", "--method", "sparsegpt", "--nm", "2:4", "--nsamples", "4",
                  "--seqlen", "64", "--out", str(plan_file))
    assert made.exit_code == 0, made.output
    assert {a["pattern"] for a in json.loads(plan_file.read_text())["actions"]} == {"2:4"}
    applied = invoke("apply", "--model", "tiny-llama", "--plan", str(plan_file), "--nsamples", "4",
                     "--out", str(tmp_path / "run"), *QUICK)
    assert applied.exit_code == 0, applied.output
    assert json.loads((tmp_path / "run" / "result.json").read_text())["metrics"]["sparsity"] == 0.5


def test_report_without_result_is_a_clear_error(tmp_path):
    result = invoke("report", str(tmp_path))
    assert result.exit_code == 2 and "holds no result.json" in result.stderr


def test_block_sparsity_of_a_record():
    from layerwise.report import block_sparsity

    record = {"metrics": {"per_unit_sparsity": {"model.layers.0.mlp.up_proj": 0.5, "model.layers.0.mlp.down_proj": 0.7,
                                                "model.layers.1.self_attn.q_proj": 0.2}}}
    assert block_sparsity(record) == {0: pytest.approx(0.6), 1: 0.2}
