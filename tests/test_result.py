"""result.json is a versioned ``Result``: every run writes one that validates, and files written before the
format field (version 1) still open in `layerwise report`."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.errors import DataError
from layerwise.result import LEGACY_FORMAT, RESULT_FORMAT, Result

QUICK = ["--seqlen", "64", "--max-windows", "2", "--no-latency"]
runner = CliRunner()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("result") / "run"
    result = runner.invoke(app, ["compress", "--model", "tiny-llama", "--method", "wanda", "--sparsity", "0.5",
                                 "--nsamples", "4", "--out", str(out), *QUICK])
    assert result.exit_code == 0, result.output
    return out


def test_every_run_writes_a_versioned_result_that_validates(run_dir, tmp_path):
    record = json.loads((run_dir / "result.json").read_text())
    assert record["format"] == RESULT_FORMAT
    loaded = Result.load(run_dir / "result.json")
    assert loaded.command == "compress" and loaded.metrics.ppl == record["metrics"]["ppl"]
    assert loaded.to_record() == record  # nothing added or dropped on the way through the model
    evaluated = runner.invoke(app, ["eval", "--model", str(run_dir), "--out", str(tmp_path / "eval"), *QUICK])
    assert evaluated.exit_code == 0, evaluated.output
    assert Result.load(tmp_path / "eval" / "result.json").command == "eval"


def test_a_result_written_before_the_format_field_still_opens_in_report(run_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    record = json.loads((run_dir / "result.json").read_text())
    del record["format"]
    (old / "result.json").write_text(json.dumps(record))
    assert Result.load(old / "result.json").format == LEGACY_FORMAT
    result = runner.invoke(app, ["report", str(old), str(run_dir), "--format", "md", "--out", str(tmp_path / "r.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r.md").read_text().count("wanda") >= 2


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda text, record: "{\"metrics\": ", "is not a readable result.json"),
    (lambda text, record: json.dumps({**record, "metrics": {**record["metrics"], "parameters": "many"}}),
     "metrics.parameters: Input should be a valid integer"),
    (lambda text, record: json.dumps({**record, "command": "shrink"}), "command: Input should be"),
    (lambda text, record: json.dumps({**record, "plan": {**record["plan"], "actions": [{"op": "melt"}]}}),
     "plan.actions.0: Input tag 'melt'"),
])
def test_a_broken_result_is_refused_in_one_sentence(run_dir, tmp_path, mutate, message):
    broken = tmp_path / "broken"
    broken.mkdir()
    text = (run_dir / "result.json").read_text()
    (broken / "result.json").write_text(mutate(text, json.loads(text)))
    with pytest.raises(DataError, match="result"):
        Result.load(broken / "result.json")
    result = runner.invoke(app, ["report", str(broken), "--format", "md", "--out", str(tmp_path / "r.md")])
    assert result.exit_code == 2 and message in " ".join(result.stderr.split()), result.output
    assert not (tmp_path / "r.md").exists()


def test_a_count_budget_stays_an_integer():
    record = {"layerwise_version": "0", "command": "compress", "model": {}, "budget": {"remove_sublayers": 2},
              "metrics": {"parameters": 1, "weight_bytes": 2}, "timings": {"total_s": 1.5}}
    written = Result.from_record(record).to_record()
    assert written["budget"] == {"remove_sublayers": 2} and isinstance(written["budget"]["remove_sublayers"], int)
