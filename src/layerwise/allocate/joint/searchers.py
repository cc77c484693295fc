"""Joint searchers, registered in ``JOINT_SEARCHERS`` and compared at an equal number of candidate
evaluations. ``evo`` and ``rl`` start from the best of the space's uniform genomes (uniform compression of all
units, of the attentions only, of the MLPs only, that meets the budget); every searcher only keeps genomes
that fit it.

- ``evo``: EvoPress (Sieberling et al., 2024): a (1 + λ) evolution whose offspring are level switches (one unit
  one step along one axis: type, width or removal; others one gentle step cheaper until the budget holds),
  selected in two steps: all offspring on a few windows, the best few on all
  windows against the parent.
- ``rl``: REINFORCE over one categorical policy per unit (AutoMP-RL's policy gradient, generalised from bits to
  every level), reward = −KL, batch-mean baseline.
- ``greedy``: sensitivity per unit of cost: one candidate per unit and level factor (removal, each narrower
  width, each narrower type, from the dense model), then the moves with the least predicted damage per
  budget unit saved until the budget holds.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from tqdm.auto import tqdm

from ...component_options import ComponentOptions, declares, option
from ...registry import Registry
from .scoring import CountingEvaluator
from .space import Genome, JointSpace


@dataclass
class SearchOutcome:
    """The best genome found, its score on all windows, and the best-so-far curve per evaluation."""

    genome: Genome
    score: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (evaluations so far, best full-stage score)
    params: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)


Searcher = Callable[..., SearchOutcome]
JOINT_SEARCHERS: Registry[Searcher] = Registry("joint searcher")


class _Tracker:
    """The best full-stage genome so far, and the curve of it against evaluations spent."""

    def __init__(self, space: JointSpace, evaluator: CountingEvaluator, candidates: int, name: str) -> None:
        self.space, self.evaluator, self.candidates = space, evaluator, candidates
        self.best: Genome | None = None
        self.best_score = math.inf
        self.curve: list[tuple[int, float]] = []
        self.bar = tqdm(total=candidates, desc=f"joint {name}", disable=None, leave=False)

    def full(self, genomes: list[Genome]) -> list[float]:
        scores = self.evaluator.score(genomes, len(self.evaluator.setup.stage_windows) - 1)
        for genome, score in zip(genomes, scores):
            if score < self.best_score and self.space.fits(genome):
                self.best, self.best_score = genome, score
        self._progress()
        return scores

    def first(self, genomes: list[Genome]) -> list[float]:
        scores = self.evaluator.score(genomes, 0)
        self._progress()
        return scores

    def _progress(self) -> None:
        self.curve.append((self.evaluator.evaluations, self.best_score))
        self.bar.n = min(self.candidates, self.evaluator.evaluations)
        self.bar.refresh()

    @property
    def left(self) -> int:
        return self.candidates - self.evaluator.evaluations

    def outcome(self, params: dict[str, Any], details: dict[str, Any] | None = None) -> SearchOutcome:
        self.bar.close()
        return SearchOutcome(self.best, self.best_score, self.curve, params, details or {})


def mutate(space: JointSpace, genome: Genome, rng: random.Random) -> Genome:
    """EvoPress's level switch: one random unit one step along one axis (type, width, removal), then other random
    units one gentle step cheaper each until the budget holds again (a draw that cannot be repaired is drawn
    again)."""
    for _ in range(100):
        unit = rng.randrange(len(genome))
        moved = genome[:unit] + (rng.choice(space.moves(unit, genome[unit])),) + genome[unit + 1 :]
        repaired = space.repair(moved, rng, keep=unit)
        if repaired is not None and repaired != genome:
            return repaired
    return genome


class EvoOptions(ComponentOptions):
    """EvoPress's selection: offspring per generation and survivors of the first step."""

    offspring: int | None = option("joint evo: offspring per generation (default 16).")
    survivors: int | None = option("joint evo: offspring the first (few-window) step passes to the second "
                                   "(default 4).")


@declares(EvoOptions)
@JOINT_SEARCHERS.register("evo", "evopress")
def evo(space: JointSpace, evaluator: CountingEvaluator, candidates: int, seed: int, offspring: int = 16,
        survivors: int = 4) -> SearchOutcome:
    rng = random.Random(seed)
    tracker = _Tracker(space, evaluator, candidates, "evo")
    parent, parent_score = start, start_score = _best_start(space, tracker)
    generations = 0
    while tracker.left > 0:
        children = list(dict.fromkeys(mutate(space, parent, rng) for _ in range(offspring)))
        children = [c for c in children if c != parent][: max(1, tracker.left)]
        if not children:
            continue
        quick = tracker.first(children)
        if tracker.left <= 0:
            break
        ranked = [c for _, c in sorted(zip(quick, children), key=lambda pair: pair[0])][:survivors]
        ranked = ranked[: max(1, tracker.left)]
        finals = tracker.full(ranked)
        best = int(np.argmin(finals))
        if finals[best] < parent_score:
            parent, parent_score = ranked[best], finals[best]
        generations += 1
    return tracker.outcome({"offspring": offspring, "survivors": survivors},
                           {"generations": generations, **_start_details(space, start, start_score)})


class RlSearchOptions(ComponentOptions):
    """The joint REINFORCE policy: episodes per update and learning rate."""

    episodes_per_update: int | None = option("joint rl: candidates sampled per policy update (default 8).")
    policy_lr: float | None = option("joint rl: learning rate of the per-unit logits (default 0.3).")


@declares(RlSearchOptions)
@JOINT_SEARCHERS.register("rl", "reinforce")
def rl(space: JointSpace, evaluator: CountingEvaluator, candidates: int, seed: int, episodes_per_update: int = 8,
       policy_lr: float = 0.3) -> SearchOutcome:
    rng = random.Random(seed)
    generator = np.random.default_rng(seed)
    tracker = _Tracker(space, evaluator, candidates, "rl")
    start, start_score = _best_start(space, tracker)
    logits = [np.zeros(len(u.levels)) for u in space.units]
    for unit, level in enumerate(start):  # start near the uniform genome, as AutoMP-RL starts near uniform bits
        logits[unit][level] = 2.0
    updates = 0
    while tracker.left > 0:
        episodes = []
        for _ in range(episodes_per_update):
            drawn = tuple(int(generator.choice(len(p), p=_softmax(p))) for p in logits)
            episodes.append(space.repair(drawn, rng) or start)
        episodes = episodes[: max(1, tracker.left)]
        rewards = -np.array(tracker.full(episodes))
        advantage = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
        for genome, a in zip(episodes, advantage):
            for unit, level in enumerate(genome):
                gradient = -_softmax(logits[unit])
                gradient[level] += 1.0
                logits[unit] += policy_lr * a * gradient / len(episodes)
        updates += 1
    return tracker.outcome({"episodes_per_update": episodes_per_update, "policy_lr": policy_lr},
                           {"updates": updates, **_start_details(space, start, start_score)})


def _best_start(space: JointSpace, tracker: _Tracker) -> tuple[Genome, float]:
    """The best of the space's uniform starting points, scored on all windows."""
    starts = space.starts()
    scores = tracker.full(starts)
    best = int(np.argmin(scores))
    return starts[best], scores[best]


def _start_details(space: JointSpace, start: Genome, score: float) -> dict[str, Any]:
    return {"start": space.describe(start), "start_costs": space.costs(start), "start_kl": score}


def _softmax(values: np.ndarray) -> np.ndarray:
    shifted = np.exp(values - values.max())
    return shifted / shifted.sum()


@JOINT_SEARCHERS.register("greedy", "sensitivity")
def greedy(space: JointSpace, evaluator: CountingEvaluator, candidates: int, seed: int) -> SearchOutcome:
    """Probes one factor at a time from the dense genome (removal; each width at the widest type; each type at
    full width; the probes come first in the unit order, so a smaller ``candidates`` probes fewer units and
    treats the rest as free), predicts a level's damage as its width's plus its type's, and then takes the
    move with the least predicted damage per unit of budget saved until every budget holds."""
    tracker = _Tracker(space, evaluator, candidates, "greedy")
    dense = space.dense()
    base = tracker.full([dense])[0]
    probes: dict[tuple[int, Any], Genome] = {}
    for u, unit in enumerate(space.units):
        full, widest = unit.levels[0].kept, unit.levels[0].kind
        for i, level in enumerate(unit.levels):
            factor = ("removed",) if level.removed else ("width", level.kept) if level.kind == widest and \
                level.kept != full else ("type", level.kind) if level.kept == full and level.kind != widest else None
            if factor is not None:
                probes[(u, factor)] = dense[:u] + (i,) + dense[u + 1 :]
    chosen = list(probes.items())[: max(0, tracker.left)]
    damage: dict[tuple[int, Any], float] = {}
    for start in range(0, len(chosen), 16):
        batch = chosen[start : start + 16]
        for (key, _), score in zip(batch, tracker.full([g for _, g in batch])):
            damage[key] = max(0.0, score - base)

    def predicted(u: int, index: int) -> float:
        level = space.units[u].levels[index]
        if level.removed:
            return damage.get((u, ("removed",)), 0.0)
        return damage.get((u, ("width", level.kept)), 0.0) + damage.get((u, ("type", level.kind)), 0.0)

    genes = list(dense)
    while not space.fits(tuple(genes)):
        before = space.violation(tuple(genes))
        best, best_ratio = None, math.inf
        for u, unit in enumerate(space.units):
            for index in range(len(unit.levels)):
                if index == genes[u]:
                    continue
                trial = genes[:u] + [index] + genes[u + 1 :]
                saved = before - space.violation(tuple(trial))
                if saved <= 0:
                    continue
                ratio = (predicted(u, index) - predicted(u, genes[u])) / saved
                if ratio < best_ratio:
                    best, best_ratio = (u, index), ratio
        if best is None:
            break
        genes[best[0]] = best[1]
    genome = tuple(genes) if space.fits(tuple(genes)) else space.uniform()
    score = tracker.full([genome])[0]  # its answer is always scored (free when a probe already was)
    outcome = tracker.outcome({}, {"probes": len(chosen)})
    outcome.genome, outcome.score = genome, score  # its own construction, not the best probe seen
    return outcome


def least_damaging_repair(space: JointSpace, evaluator: CountingEvaluator, genome: Genome) -> Genome | None:
    """Make ``genome`` fit the space's (tightened) budget one gentle step at a time (``cheaper_move``), each time
    taking the step that costs the least calibration KL per unit of budget saved, as measured on all windows.
    Every unit's step is scored once, from the genome as it was when that step was first offered, and rescored
    only when its unit moves (greedy's approximation: the damages of steps in other units add up). None when no
    unit can get cheaper any more."""
    full = len(evaluator.setup.stage_windows) - 1
    genes = list(genome)
    current = evaluator.score([genome], full)[0]
    damage: dict[tuple[int, int], float] = {}
    while (before := space.violation(tuple(genes))) > 0:
        steps = {u: step for u in range(len(genes)) for step in [space.cheaper_move(u, genes[u])] if step is not None}
        if not steps:
            return None
        trials = {u: tuple(genes[:u] + [step] + genes[u + 1 :]) for u, step in steps.items()}
        fresh = [u for u, step in steps.items() if (u, step) not in damage]
        for u, score in zip(fresh, evaluator.score([trials[u] for u in fresh], full)):
            damage[(u, steps[u])] = score - current
        saved = {u: before - space.violation(trial) for u, trial in trials.items()}
        unit = min(steps, key=lambda u: damage[(u, steps[u])] / saved[u] if saved[u] > 0 else math.inf)
        genes[unit] = steps[unit]
        current = evaluator.score([tuple(genes)], full)[0]
    return tuple(genes)
