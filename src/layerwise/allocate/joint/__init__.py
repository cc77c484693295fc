"""The joint search over widths, removals and GGUF types under one budget: space, level bank, scoring
(serial or Ray) and the registered searchers."""

from .scoring import CountingEvaluator, RayEvaluator, ScoringSetup, SerialEvaluator, dense_logprobs
from .searchers import JOINT_SEARCHERS, SearchOutcome
from .space import Budgets, JointSpace, Level, build_space


def make_evaluator(model, setup: ScoringSetup, workers: int = 0, address: str | None = None) -> CountingEvaluator:
    """Serial scoring, or ``workers`` Ray workers (``address``: an existing cluster)."""
    if workers > 0 or address:
        return RayEvaluator(model, setup, max(1, workers), address)
    return SerialEvaluator(model, setup)


__all__ = ["Budgets", "CountingEvaluator", "JOINT_SEARCHERS", "JointSpace", "Level", "RayEvaluator",
           "ScoringSetup", "SearchOutcome", "SerialEvaluator", "build_space", "dense_logprobs", "make_evaluator"]
