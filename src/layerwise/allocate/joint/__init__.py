"""The joint search over widths, removals and GGUF types under one budget: space, level bank, scoring
(serial or Ray) and the registered searchers."""

from .scoring import CountingEvaluator, ModelBySpec, RayEvaluator, ScoringSetup, SerialEvaluator, dense_logprobs
from .searchers import JOINT_SEARCHERS, SearchOutcome
from .space import Budgets, JointSpace, Level, build_space


def make_evaluator(model, setup: ScoringSetup, workers: int = 0, address: str | None = None,
                   by_spec: ModelBySpec | None = None) -> CountingEvaluator:
    """Serial scoring, or ``workers`` Ray workers; on the cluster at ``address`` they load ``by_spec``."""
    if workers > 0 or address:
        return RayEvaluator(by_spec if address and by_spec else model, setup, max(1, workers), address)
    return SerialEvaluator(model, setup)


__all__ = ["Budgets", "CountingEvaluator", "JOINT_SEARCHERS", "JointSpace", "Level", "ModelBySpec", "RayEvaluator",
           "ScoringSetup", "SearchOutcome", "SerialEvaluator", "build_space", "dense_logprobs", "make_evaluator"]
