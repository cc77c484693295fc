"""Depth allocators: ``(context, budget, **options) -> DepthAllocation``, an ordered list of sublayers to remove.

A search works on the model in place but only through reversible steps (``temporarily_removed`` and
swapped weight columns inside one ExitStack), so the model is as it was when the allocator returns.
Searches stop as soon as the budget holds: predicted speedup (from the measured latency table) at least
the target, or the requested number of sublayers removed.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..component_options import ComponentOptions, option
from ..config import Budget
from ..cost.latency_table import LatencyTable
from ..errors import BudgetError
from ..models.adapter import get_adapter
from ..ops.depth import temporarily_removed
from ..registry import Registry


@dataclass
class DepthStep:
    """One search step: what it removed, the predicted speedup after it, and the search time so far."""

    removed: list[str]
    predicted_speedup: float
    elapsed_s: float
    score: Optional[float] = None


@dataclass
class CheckpointOptions(ComponentOptions):
    """Where a depth search keeps its activation checkpoints."""

    checkpointing_on_cpu: Optional[bool] = option("sprint/sleb: keep checkpoints in CPU memory.",
                                                  "--checkpointing-on-cpu/--checkpointing-on-device")

@dataclass
class DepthContext:
    """What a depth allocator reads: the model, calibration windows, the latency table, and a hook the
    pipeline uses to evaluate intermediate speedups while the search state is live."""

    model: nn.Module
    latency: LatencyTable
    calibration: Any = None  # a CalibrationSource
    seed: int = 0
    batch_size: int = 8
    on_step: Optional[Callable[[DepthStep, list[str]], None]] = None

    def tokens(self) -> torch.Tensor:
        if self.calibration is None:
            raise BudgetError("This depth allocator needs calibration data, but the run has none.")
        return self.calibration.tokens()


@dataclass
class DepthAllocation:
    """Sublayers to remove, in the order chosen, with per-removal tuning specs and the search trace."""

    removed: list[str]
    steps: list[DepthStep]
    tuning: dict[str, dict] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


DepthAllocator = Callable[..., DepthAllocation]
DEPTH_ALLOCATORS: Registry[DepthAllocator] = Registry("depth allocator")


class RemovalSearch:
    """Book-keeping shared by the depth allocators: the removal order, the stopping rule, the trace, and
    the reversible removals (undone by ``close``)."""

    def __init__(self, context: DepthContext, budget: Budget) -> None:
        if budget.target_speedup is None and budget.remove_sublayers is None:
            raise BudgetError("Depth pruning needs --target-speedup or --num-remove-sublayers.")
        self.context = context
        self.budget = budget
        self.adapter = get_adapter(context.model)
        self.kinds = {s.name: s.kind for s in self.adapter.all_sublayers()}
        if budget.remove_sublayers is not None and budget.remove_sublayers >= len(self.kinds):
            raise BudgetError(f"The model has {len(self.kinds)} sublayers, so it cannot remove "
                              f"{budget.remove_sublayers} sublayers and keep one.")
        self.removed: list[str] = []
        self.steps: list[DepthStep] = []
        self.started = time.perf_counter()
        self.paused = 0.0
        self._stack = contextlib.ExitStack()
        goal = (f"{budget.remove_sublayers} removals" if budget.remove_sublayers is not None
                else f"{budget.target_speedup:g}x predicted")
        self.bar = tqdm(total=100, desc=f"depth search to {goal}", disable=None,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix} [{elapsed}<{remaining}]")

    def progress(self) -> float:
        """Share of the way to the budget: removals made, or predicted time saved over the time to save."""
        if self.budget.remove_sublayers is not None:
            return len(self.removed) / self.budget.remove_sublayers
        wanted = 1.0 - 1.0 / self.budget.target_speedup
        return min(1.0, (1.0 - 1.0 / self.predicted_speedup()) / wanted) if wanted > 0 else 1.0

    def predicted_speedup(self, extra: list[str] = ()) -> float:
        return self.context.latency.predicted_speedup([self.kinds[n] for n in [*self.removed, *extra]])

    def met(self) -> bool:
        if self.budget.remove_sublayers is not None:
            return len(self.removed) >= self.budget.remove_sublayers
        return self.predicted_speedup() >= self.budget.target_speedup - 1e-12

    def done(self) -> bool:
        """True once the budget holds; a BudgetError when nothing is left to remove and it still does not."""
        if self.met():
            return True
        if not self.remaining():
            wanted = (f"speedup {self.budget.target_speedup}" if self.budget.target_speedup is not None
                      else f"{self.budget.remove_sublayers} removals")
            most = self.predicted_speedup()
            hint = f"; lower --target-speedup to at most {most:.2f}" if self.budget.target_speedup is not None else ""
            raise BudgetError(f"Cannot reach {wanted}: removing every sublayer is predicted to give only "
                              f"{most:.2f}x on this machine{hint}.")
        return False

    def remaining(self) -> list[str]:
        return [name for name in self.kinds if name not in self.removed]

    def enter(self, manager: contextlib.AbstractContextManager) -> None:
        """Keep a reversible change (removal, swapped columns) until ``close``."""
        self._stack.enter_context(manager)

    def record(self, names: list[str], score: float | None = None) -> None:
        """Note a step whose sublayers the caller has already (reversibly) removed."""

        self.enter(temporarily_removed(self.context.model, names))
        self.removed.extend(names)
        step = DepthStep(list(names), round(self.predicted_speedup(), 4), self.elapsed(), score)
        self.steps.append(step)
        self.bar.update(round(100 * self.progress()) - self.bar.n)
        self.bar.set_postfix_str(f"{len(self.removed)} removed, {step.predicted_speedup:.2f}x", refresh=True)
        if self.context.on_step is not None:
            paused = time.perf_counter()
            self.context.on_step(step, list(self.removed))
            self.paused += time.perf_counter() - paused

    def elapsed(self) -> float:
        """Search time so far, without the pipeline's intermediate evaluations."""
        return round(time.perf_counter() - self.started - self.paused, 3)

    def close(self) -> None:
        self.bar.close()
        self._stack.close()

    def allocation(self, params: dict[str, Any], details: dict[str, Any] | None = None,
                   tuning: dict[str, dict] | None = None) -> DepthAllocation:
        return DepthAllocation(self.removed, self.steps, tuning or {}, params, details or {}, self.elapsed())


def remove_blocks_in_order(search: RemovalSearch, order: list[int], scores: dict[int, float] | None = None) -> None:
    """Remove whole blocks (both sublayers) in ``order`` until the budget holds: the block-level baselines."""
    for block in order:
        if search.done():
            break
        names = [s.name for s in search.adapter.sublayers(block)]
        if names:
            search.record(names, None if scores is None else scores[block])
    search.done()  # raises when the budget is out of reach
