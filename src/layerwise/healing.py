"""The heal stage of the pipeline: train a compressed model toward its dense teacher, inline in ``compress``
(``--heal``) or on a saved run (``layerwise heal RUN --out DIR``), and record what it did beside the metrics."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Optional

from torch import nn
from transformers import PreTrainedTokenizerBase

from .cache import atomic_write_json, ensure_output_free, staged_directory
from .config import HealSetting, RunSettings
from .cost import measure_size
from .data import window_bos
from .data.training import TrainingStream, training_stream
from .deploy import deploy_run
from .environment import machine, versions
from .errors import DataError
from .heal import heal
from .measure import Timings, measure_model, timed
from .models import LoadedModel, load, save
from .plan import Plan
from .report.allocation import read_result
from .result import Result
from .version import __version__


def checkpoint_dir(out: str | Path) -> Path:
    """Where healing for output ``out`` keeps its resumable checkpoint: a hidden sibling, never inside ``out``
    (which appears only when the run is complete)."""
    out = Path(out)
    return out.parent / f".{out.name}.heal-checkpoint"


def stream_for(tokenizer: PreTrainedTokenizerBase, setting: HealSetting) -> TrainingStream:
    """The training text ``setting`` names, packed with ``tokenizer`` and its BOS convention."""
    return training_stream(tokenizer, setting.seqlen, setting.seed, setting.corpus, setting.train_text,
                           setting.heldout_windows, bos=window_bos(tokenizer))


def heal_measured(loaded: LoadedModel, teacher: Optional[nn.Module], setting: HealSetting, settings: RunSettings,
                  timings: Timings, out: str | Path, resume: bool = False) -> dict[str, Any]:
    """The compressed model's perplexity under ``settings``, then healing: the report with ``ppl_before``."""
    before = measure_model(loaded, settings.model_copy(update={"tasks": [], "latency": None}), timings,
                           "pre_heal_", cached=False)
    return {**heal_loaded(loaded, teacher, setting, timings, out, resume), "ppl_before": before.get("ppl")}


def heal_loaded(student: LoadedModel, teacher: Optional[nn.Module], setting: HealSetting, timings: Timings,
                out: str | Path, resume: bool = False) -> dict[str, Any]:
    """Heal ``student`` in place on the training text (packed with its tokenizer and BOS convention); the
    report's fields as a dict. The checkpoint lives beside ``out`` until healing completes."""
    stream = stream_for(student.tokenizer, setting)
    directory = checkpoint_dir(out)
    with timed(timings, "heal_s"):
        report = heal(student.model, teacher, stream, setting, directory, resume,
                      desc=f"healing ({setting.method})")
    shutil.rmtree(directory, ignore_errors=True)
    return report.model_dump()


def heal_run(run_dir: str | Path, out: str | Path, setting: HealSetting, overrides: dict[str, Any] | None = None,
             overwrite: bool = False, resume: bool = False) -> dict:
    """Heal the model saved in ``run_dir`` (a ``compress``/``apply`` output) toward the dense model it was
    compressed from, evaluate it under the run's own evaluation settings (``overrides`` replace some), and write
    a run directory at ``out``: the healed model and result.json with the healing record."""
    ensure_output_free(out, overwrite)
    source = read_result(run_dir)
    if source["command"] == "eval":
        raise DataError(f"{run_dir} holds an evaluation, not a compressed model; heal a directory written by "
                        "`layerwise compress` or `layerwise apply`.")
    settings = RunSettings(**{**source["settings"], **(overrides or {}), "heal": setting.model_dump()})
    started = time.perf_counter()
    timings: Timings = {}
    with timed(timings, "load_s"):
        student = load(str(run_dir), dtype=settings.dtype, device=settings.device)
        teacher = load(source["model"]["spec"], dtype=settings.dtype, device=settings.device).model
    healing = heal_loaded(student, teacher, setting, timings, out, resume)
    del teacher
    alone = settings.model_copy(update={"latency": settings.latency.model_copy(update={"paired": False})
                                        if settings.latency else None})
    measured = measure_model(student, alone, timings, "", cached=False)
    size = measure_size(student.model)
    before = source["metrics"]
    metrics = {**before, "ppl": measured.get("ppl"), "zeroshot": measured["zeroshot"],
               "latency": measured["latency"], "parameters": size.parameters,
               "nonzero_parameters": size.nonzero_parameters, "weight_bytes": size.weight_bytes,
               "healing": {**healing, "ppl_before": before.get("ppl"), "ppl_after": measured.get("ppl")}}
    record = {key: source[key] for key in ("method", "allocator", "budget", "calibration", "plan") if key in source}
    record.update(layerwise_version=__version__, command="heal", model={**source["model"], "healed_from": str(run_dir)},
                  metrics=metrics, protocol=measured.get("protocol"), timings=timings, seed=settings.seed,
                  settings=settings.model_dump(), versions=versions(), machine=machine(settings.device))
    plan_file = Path(run_dir) / "plan.json"
    plan = Plan.load(plan_file) if plan_file.is_file() else None
    with staged_directory(Path(out), overwrite) as staging:
        with timed(timings, "save_s"):
            save(student, staging, plan)
        if settings.deploy:
            record["deployment"] = {"dense": (source.get("deployment") or {}).get("dense"),
                                    "compressed": deploy_run(student, settings, staging, timings)}
        timings["total_s"] = round(time.perf_counter() - started, 3)
        record = Result.from_record(record).to_record()
        atomic_write_json(staging / "result.json", record)
    return record
