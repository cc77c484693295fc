"""One measured speed guard for every plan made to a speedup (depth's removals, the joint search's genomes): the
same rounds, the same paired measurement, the same correction — so rows planned to one speed budget compare
fairly."""

from __future__ import annotations

from typing import Callable, TypeVar

from ..config import LatencySetting
from ..cost.latency_table import changed_copy, paired_latency
from ..errors import BudgetError
from ..models import LoadedModel

GUARD_ROUNDS = 3  # measurements of the plan, at most

P = TypeVar("P")


def guard_speed(target: float, plan: P, measure: Callable[[P], float], predicted: Callable[[P], float],
                replan: Callable[[P, float], P | None], rounds: int = GUARD_ROUNDS) -> tuple[P, list[dict[str, float]]]:
    """Measure the plan's speedup the way the result is measured. The tables predict each change alone; together
    they can overlap or interact, so when the plan measures short of ``target`` the predicted budget is raised by
    the prediction's error (predicted / measured) and ``replan`` makes a plan for it (a search's own cheaper moves,
    or the allocator again), measured in turn. It aims at the target itself, not below it, since paired
    measurements still differ by a percent or two. Returns the plan and each round's predicted / measured speedup
    and the budget it was planned under."""
    budget = target
    history: list[dict[str, float]] = []
    for attempt in range(rounds):
        measured, expected = measure(plan), predicted(plan)
        history.append({"predicted": round(expected, 4), "measured": round(measured, 4), "budget": round(budget, 4)})
        if measured >= target or attempt == rounds - 1:
            break
        budget *= expected / measured
        again = replan(plan, budget)
        if again is None:
            raise BudgetError(f"The plan measures {measured:.2f}x against a {target:g}x target, and nothing more can "
                              "be removed or made cheaper; lower --target-speedup or allow more levels.")
        plan = again
    return plan, history


def speedup_of(loaded: LoadedModel, change: Callable[[object], None], setting: LatencySetting, engine: str) -> float:
    """The dense model's latency over that of a copy ``change`` was applied to, timed in alternating runs in
    ``engine`` (as results and latency tables are measured)."""
    return paired_latency(loaded, changed_copy(loaded, change), setting, engine).speedup["total"]
