"""An engine is one module: how it evaluates a model (``ENGINES``) and how it times two models in alternating
runs (``PAIRED_LATENCY``, what latency tables and speed guards use). This file adds one, PyTorch computing in
bfloat16, and eval and the latency-table searches take it by name with no other change."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

from layerwise.cli import app
from layerwise.config import LatencySetting, RunSettings
from layerwise.cost.latency import PairedLatency, measure_paired_latency
from layerwise.cost.latency_table import PAIRED_LATENCY
from layerwise.engines import ENGINES, Evaluation
from layerwise.measure import Timings
from layerwise.models import LoadedModel

QUICK = ["--seqlen", "64", "--max-windows", "2"]


def evaluate_bf16(spec: str, settings: RunSettings, timings: Timings) -> Evaluation:
    evaluation = ENGINES.get("pytorch")(spec, settings.model_copy(update={"dtype": "bfloat16"}), timings)
    evaluation.model["source"] += " (bfloat16)"
    return evaluation


def paired_bf16(reference: LoadedModel, model: LoadedModel, setting: LatencySetting, outtype: str = "f16",
                embedding_type: str | None = None) -> PairedLatency:
    pair = [copy.deepcopy(loaded.model).to(torch.bfloat16) for loaded in (reference, model)]
    return measure_paired_latency(*pair, setting)


@pytest.fixture
def bf16_engine(monkeypatch):
    monkeypatch.setitem(ENGINES._items, "torch-bf16", evaluate_bf16)
    monkeypatch.setitem(PAIRED_LATENCY._items, "torch-bf16", paired_bf16)


def test_a_new_engine_is_one_module_and_its_registrations(bf16_engine, tmp_path):
    runs = {}
    for engine in ("pytorch", "torch-bf16"):
        result = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--engine", engine, "--no-latency",
                                          *QUICK, "--out", str(tmp_path / engine)])
        assert result.exit_code == 0, result.output
        runs[engine] = json.loads((tmp_path / engine / "result.json").read_text())
    bf16 = runs["torch-bf16"]
    assert bf16["settings"]["engine"] == "torch-bf16" and bf16["model"]["source"].endswith("(bfloat16)")
    assert bf16["metrics"]["ppl"] == pytest.approx(runs["pytorch"]["metrics"]["ppl"], rel=0.05)
    assert bf16["metrics"]["ppl"] != runs["pytorch"]["metrics"]["ppl"]  # computed in another dtype

    plan_file = tmp_path / "plan.json"
    planned = CliRunner().invoke(app, ["plan", "--model", "tiny-llama", "--structure", "depth", "--target-speedup",
                                       "1.2", "--allocator", "drop-last", "--latency-engine", "torch-bf16",
                                       "--prompt-length", "8",
                                       "--generation-length", "2", "--out", str(plan_file)])
    assert planned.exit_code == 0, planned.output
    table = json.loads(plan_file.read_text())["prediction"]["latency_table"]
    assert table["engine"] == "torch-bf16" and table["total_ms"] > 0


def test_an_unknown_engine_is_refused_by_name():
    result = CliRunner().invoke(app, ["eval", "--model", "tiny-llama", "--engine", "tpu", "--no-latency", *QUICK])
    assert result.exit_code == 2
    assert "Unknown engine 'tpu'; choose one of: llama.cpp, pytorch." in " ".join(result.stderr.split())
