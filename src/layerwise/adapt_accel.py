"""Adapt-Accel (Adapt-Pruner's prune–train interleaving): reach the budget in K pruning stages; each stage
re-scores importance and re-runs the allocator on the current, already-healed model, then heals its share of
the tokens. As in Adapt-Pruner's iterative scripts, the parameter target falls linearly over the stages, the
training text is split evenly between them, and one learning-rate schedule runs across all of them (theirs is
warm-up-stable-decay, ours the warm-up + cosine of every healing run)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from torch import nn
from tqdm.auto import tqdm

from .calibration import CalibrationSource
from .config import Budget, RunSettings
from .errors import SettingsError
from .heal import Schedule, heal
from .healing import checkpoint_dir, stream_for
from .measure import Timings
from .models import LoadedModel
from .ops import ApplyContext, apply_plan
from .plan import Plan
from .planning import make_plan
from .structures import STRUCTURES


@dataclass
class AdaptAccel:
    """The request of an interleaved run: what to prune toward, in how many stages."""

    budget: Budget
    method: str | None
    allocator: str
    structure: str
    stages: int
    params: dict[str, Any] = field(default_factory=dict)

    def run(self, loaded: LoadedModel, teacher: Optional[nn.Module], settings: RunSettings, out: str | Path,
            resume: bool, timings: Timings) -> tuple[Plan, Optional[dict[str, Any]]]:
        """Prune and heal ``loaded`` in place, stage by stage; the composed plan (the original model to the
        final shapes) and the merged healing record (None without --heal)."""
        if resume:
            raise SettingsError("--resume continues a single healing run; an interleaved run (--iterative-steps) "
                                "starts over.")
        structure = STRUCTURES.get(self.structure)
        budgets = [structure.stage_budget(self.budget, k, self.stages) for k in range(1, self.stages + 1)]
        setting = settings.heal
        stage_setting = setting.model_copy(update={"tokens": max(1, setting.tokens // self.stages)}) if setting else None
        schedule = Schedule.for_setting(stage_setting, stage_setting.steps * self.stages) if setting else None
        stream = stream_for(loaded.tokenizer, setting) if setting else None
        plans, reports = [], []
        for stage, budget in enumerate(tqdm(budgets, desc="Adapt-Accel stages", unit="stage", disable=None), start=1):
            calibration = CalibrationSource(loaded, settings)  # importance of the model as it is now
            plan = make_plan(loaded, budget, self.method, self.allocator, settings.seed, calibration, None,
                             self.structure, **self.params)
            apply_plan(loaded.model, plan, ApplyContext(calibration))
            plans.append(plan)
            if setting is not None:
                reports.append(heal(loaded.model, teacher, stream, stage_setting, checkpoint_dir(out),
                                    schedule=schedule, first_step=(stage - 1) * stage_setting.steps,
                                    desc=f"healing stage {stage}/{self.stages} ({setting.method})").model_dump())
        plan = structure.compose(plans, loaded.model).model_copy(update={"budget": self.budget})
        plan.details["iterative_steps"] = self.stages
        return plan, merge_reports(reports) if reports else None


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One healing record for consecutive stages: tokens, time and curves added up (tokens counted from the
    first stage), the first stage's setting with the total budget, and each stage's own summary."""
    first, offset = reports[0], 0
    curve, heldout, stages = [], [], []
    for report in reports:
        curve += [{**point, "tokens": point["tokens"] + offset} for point in report["curve"]]
        heldout += [{**point, "tokens": point["tokens"] + offset} for point in report["heldout"]]
        stages.append({key: report[key] for key in ("tokens", "steps", "first_step", "train_seconds", "tokens_per_s")}
                      | {"heldout_end": report["heldout"][-1] if report["heldout"] else None})
        offset += report["tokens"]
    train_seconds = sum(r["train_seconds"] for r in reports)
    return {**first, "tokens": offset, "steps": sum(r["steps"] for r in reports), "curve": curve,
            "heldout": heldout, "train_seconds": round(train_seconds, 3),
            "tokens_per_s": round(offset / max(train_seconds, 1e-9), 2),
            "seconds": round(sum(r["seconds"] for r in reports), 3),
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in reports),
            "setting": {**first["setting"], "tokens": offset}, "stages": stages}
