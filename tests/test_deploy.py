"""compress --export gguf measures the file the way GGUF users compare files: KL divergence to the dense export on
the same windows, beside the controls they would otherwise pick (llama.cpp's recipe nearest in size with the same
importance matrix, the GGUF file the model came from)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import QUICK, invoke
from typer.testing import CliRunner

import layerwise
from layerwise.cli import app
from layerwise.deploy_controls import CONTROL_RECIPES
from layerwise.engines.llamacpp_eval import gguf_size
from layerwise.export import export_gguf
from layerwise.export.llama_quantize import llama_quantize

QUANT = ["compress", "--model", "tiny-llama", "--structure", "quant", "--allocator", "greedy", "--bits",
         "f16,q8_0,q4_0", "--avg-bits", "6", "--export", "gguf", *QUICK]


@pytest.fixture(scope="module")
def controlled(tmp_path_factory):
    """One run with both controls; the source control is the tiny model's own f16 export (tiny-llama is built
    in code, so it has no GGUF of its own to come from)."""
    import layerwise.deploy_controls as controls

    directory = tmp_path_factory.mktemp("deploy")
    source = Path(export_gguf(layerwise.load("tiny-llama"), directory / "distributed.gguf", "f16").path)
    patch = pytest.MonkeyPatch()
    patch.setattr(controls, "source_gguf", lambda loaded: source)
    try:
        result = CliRunner().invoke(app, [*QUANT, "--deploy-controls", "recipe,source", "--out", str(directory / "run")],
                                    env={"COLUMNS": "240"})  # the table's five columns unwrapped
    finally:
        patch.undo()
    assert result.exit_code == 0, result.output
    return directory, result, json.loads((directory / "run" / "result.json").read_text())


def test_the_deployed_file_carries_its_kld_to_the_dense_export(controlled):
    _, _, record = controlled
    compressed = record["deployment"]["compressed"]
    kld = compressed["kld"]
    assert kld["reference"] == "dense export (model.gguf)"
    assert 0 < kld["mean"] <= kld["max"] and kld["median"] <= kld["p99"] <= kld["p999"] <= kld["max"]
    assert 0.5 < kld["same_top"] <= 1.0 and kld["tokens"] == compressed["protocol"]["predicted_tokens"]
    assert compressed["ppl"] == pytest.approx(kld["ppl"], rel=1e-9)  # one llama.cpp pass gives both
    assert kld["reference_ppl"] == pytest.approx(record["deployment"]["dense"]["ppl"], rel=1e-6)


def test_the_kld_pass_gives_the_same_perplexity_as_the_perplexity_pass(controlled, tmp_path):
    _, _, record = controlled
    result = invoke(*QUANT, "--no-kld", "--out", str(tmp_path / "plain"))
    assert result.exit_code == 0, result.output
    plain = json.loads((tmp_path / "plain" / "result.json").read_text())["deployment"]["compressed"]
    assert plain["kld"] is None
    assert plain["ppl"] == pytest.approx(record["deployment"]["compressed"]["ppl"], rel=1e-6)


def test_the_recipe_control_is_llamacpps_recipe_nearest_in_size(controlled, tmp_path):
    directory, result, record = controlled
    ours = record["deployment"]["compressed"]["weight_bytes"]
    control = record["deployment"]["controls"]["recipe"]
    assert control["recipe"] in CONTROL_RECIPES and control["imatrix"] is True
    dense = tmp_path / "dense.gguf"
    export_gguf(layerwise.load("tiny-llama"), dense, "f16")
    sizes = {}
    for recipe in CONTROL_RECIPES:
        sizes[recipe] = gguf_size(llama_quantize(dense, tmp_path / f"{recipe}.gguf", recipe))["weight_bytes"]
    assert control["weight_bytes"] == sizes[control["recipe"]]
    assert abs(sizes[control["recipe"]] - ours) == min(abs(size - ours) for size in sizes.values())
    assert 0 < control["kld"]["mean"] and control["kld"]["reference"] == "dense export (model.gguf)"
    assert f"llama.cpp {control['recipe']} + imatrix" in result.stdout  # a column of the deployment table


def test_the_source_control_is_the_file_as_distributed(controlled):
    _, result, record = controlled
    source = record["deployment"]["controls"]["source"]
    assert source["file"] == "distributed.gguf"
    # the tiny model's own f16 file is what the dense export writes again: nothing differs
    assert source["kld"]["mean"] == pytest.approx(0.0, abs=1e-9) and source["kld"]["same_top"] == 1.0
    assert "as distributed (distributed.gguf)" in result.stdout


def test_a_model_without_a_source_file_has_no_source_control(tmp_path):
    result = invoke(*QUANT, "--deploy-controls", "source", "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "result.json").read_text())["deployment"]["controls"] == {}


@pytest.mark.parametrize(("extra", "message"), [
    (["--deploy-controls", "recipe"], "--deploy-controls measures files beside the exported one; add --export gguf"),
    (["--export", "gguf", "--deploy-controls", "nearest"],
     "Unknown deployment control 'nearest'; choose one of: recipe, source"),
])
def test_deploy_control_errors_are_one_sentence(tmp_path, extra, message):
    result = invoke("compress", "--model", "tiny-llama", *extra, "--out", str(tmp_path / "o"), *QUICK)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())
    assert not (tmp_path / "o").exists()


def test_llamacpp_files_are_timed_in_pairs_with_the_dense_export(tmp_path, monkeypatch):
    """Like PyTorch models, two GGUF files are timed AB, BA, AB, ...; the machine slowing by half with every pair
    cancels out of each pair's ratio."""
    import itertools

    from layerwise.config import LatencySetting
    from layerwise.cost import measure_paired_latency
    from layerwise.engines import llamacpp

    dense = Path(export_gguf(layerwise.load("tiny-llama"), tmp_path / "dense.gguf", "f16").path)
    half = Path(llama_quantize(dense, tmp_path / "q8.gguf", "Q8_0"))
    clock, order = itertools.count(), []

    def drifting_runs(self, setting):
        work = 2.0 if Path(self.path) == dense else 1.0
        while True:
            order.append("A" if work == 2.0 else "B")
            slow = 1.5 ** (next(clock) // 2)
            yield 0.25 * work * slow, 0.75 * work * slow

    monkeypatch.setattr(llamacpp.LlamaCppModel, "timed_runs", drifting_runs)
    setting = LatencySetting(warmup=1, repeats=4, generation_length=2)
    with llamacpp.LlamaCppModel.for_latency(dense, setting) as a, llamacpp.LlamaCppModel.for_latency(half, setting) as b:
        pair = measure_paired_latency(a, b, setting)
    assert pair.speedup == {"total": 2.0, "prefill": 2.0, "decode": 2.0}
    assert "".join(order) == "ABBAABBAAB" and pair.reference.device == "llama.cpp (cpu)"


def test_the_deployed_file_is_timed_beside_the_dense_export(tmp_path):
    args = [a for a in QUANT if a != "--no-latency"]
    result = invoke(*args, "--prompt-length", "8", "--generation-length", "2", "--speedup-iterations", "2",
                    "--out", str(tmp_path / "run"))
    assert result.exit_code == 0, result.output
    compressed = json.loads((tmp_path / "run" / "result.json").read_text())["deployment"]["compressed"]
    assert set(compressed["speedup"]) == {"total", "prefill", "decode"} and compressed["speedup"]["total"] > 0
    for latency in (compressed["latency"], compressed["reference_latency"]):
        low, high = latency["prefill_ms_range"]
        assert low <= latency["prefill_ms"] <= high and latency["setting"]["repeats"] == 2


def test_a_kept_reference_runs_the_dense_export_once_and_gives_the_same_kld(controlled, tmp_path, monkeypatch):
    """DeploySetting.reference_logits (what the deployment benchmark keeps for its ~20 files): the dense export's
    windows are evaluated once for the plan's file and its control together, later runs read them back, and the
    KL divergences are those of a run that recomputes the reference per file."""
    from layerwise import deploy
    from layerwise.config import Budget, DeploySetting, RunSettings
    from layerwise.engines import llamacpp_eval, reference
    from layerwise.pipeline import compress

    evaluated: list[str] = []
    plain = reference.llamacpp_logits

    def counted(model):
        logits = plain(model)

        def window(batch):
            evaluated.extend(["dense" if "layerwise-dense-" in str(model.path) else "file"] * len(batch))
            return logits(batch)
        return window

    for module in (reference, deploy, llamacpp_eval):  # every module that runs a GGUF file's logits
        monkeypatch.setattr(module, "llamacpp_logits", counted)
    store = tmp_path / "reference"
    settings = RunSettings(seqlen=64, max_windows=2, latency=None,
                           deploy=DeploySetting(controls=["recipe"], reference_logits=str(store)))

    def run(name: str) -> dict:
        evaluated.clear()
        return compress("tiny-llama", Budget.for_bits(6.0), "gguf", "greedy", settings, tmp_path / name,
                        structure="quant", bits="f16,q8_0,q4_0")["deployment"]

    first = run("first")
    assert evaluated.count("dense") == 2 and evaluated.count("file") == 4  # 2 windows; the plan's file, the recipe
    assert len(list(store.glob("*/*.npy"))) == 2
    second = run("second")
    assert evaluated.count("dense") == 0 and evaluated.count("file") == 4
    _, _, recomputed = controlled
    for deployment in (first, second):
        assert deployment["compressed"]["kld"]["mean"] == pytest.approx(
            recomputed["deployment"]["compressed"]["kld"]["mean"], rel=1e-6)
        assert deployment["controls"]["recipe"]["kld"]["mean"] == pytest.approx(
            recomputed["deployment"]["controls"]["recipe"]["kld"]["mean"], rel=1e-6)
