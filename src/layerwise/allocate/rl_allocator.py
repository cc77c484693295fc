"""``rl`` (RL-Allocator): a policy visits the eligible layers in order and picks each one's keep ratios for
heads and FFN from a discrete set. The global budget is enforced exactly: the remaining budget is in the
observation, and the episode's choices are projected by ``fit_budget``, which rescales the FFN choices in
proportion (a policy that over- or under-spends shifts every layer a little rather than starving the last
ones). The episode's reward is the mixed objective; the best plan seen is returned."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from ..component_options import declares
from ..errors import BudgetError
from .rl_training import RlOptions, SearchLog, search_objective, train_policy, unit_importance
from .width import WIDTH_ALLOCATORS, WidthAllocation, WidthContext, WidthSpace, fit_budget, timed_allocation
from .width_objective import RewardWeights

OBSERVATION = ("position", "depth", "attention_eligible", "mlp_eligible", "head_importance", "ffn_importance",
               "budget_left", "capacity_after", "previous_head_keep", "previous_ffn_keep")


class WidthAllocationEnv(gym.Env):
    """One episode = one allocation: a step per eligible layer, action (head level, FFN level)."""

    metadata = {"render_modes": []}

    def __init__(self, space: WidthSpace, log: SearchLog, scores: Any, ffn_levels: int = 10) -> None:
        self.space, self.log = space, log
        self.blocks = space.blocks
        most_groups = max(space.groups.values(), default=1)
        self.head_levels = [k / most_groups for k in range(1, most_groups + 1)]
        self.ffn_levels = [k / ffn_levels for k in range(1, ffn_levels + 1)]
        self.action_space = gym.spaces.MultiDiscrete([len(self.head_levels), len(self.ffn_levels)])
        self.observation_space = gym.spaces.Box(0.0, 1.0, (len(OBSERVATION),), dtype=np.float32)
        self.head_importance, self.ffn_importance = unit_importance(scores, self.blocks)
        self._capacity = [self._capacity_from(t) for t in range(len(self.blocks) + 1)]
        self._reset_state()

    def _layer_parts(self, block: int) -> tuple[int, int]:
        """(parameters of the layer's eligible heads, of its eligible FFN)."""
        return (self.space.groups.get(block, 0) * self.space.group_params,
                self.space.channels.get(block, 0) * self.space.channel_params)

    def _capacity_from(self, t: int) -> float:
        return sum(self.space.layer_max_removal(b) for b in self.blocks[t:])

    def _reset_state(self) -> None:
        self.t, self.removed = 0, 0.0
        self.head_keep: dict[int, float] = {}
        self.ffn_keep: dict[int, float] = {}
        self.previous = (1.0, 1.0)

    def _observation(self) -> np.ndarray:
        eligible = self.space.eligible_parameters
        if self.t < len(self.blocks):
            block = self.blocks[self.t]
            layer = [self.t / len(self.blocks), block / max(1, self.space.num_blocks - 1),
                     float(block in self.space.groups), float(block in self.space.channels),
                     self.head_importance[block], self.ffn_importance[block]]
        else:
            layer = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
        left = (self.space.target_removed - self.removed) / eligible
        capacity = self._capacity[min(self.t + 1, len(self.blocks))] / eligible
        values = layer + [left, capacity, *self.previous]
        return np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._reset_state()
        return self._observation(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        block = self.blocks[self.t]
        head_keep, ffn_keep = self.head_levels[int(action[0])], self.ffn_levels[int(action[1])]
        heads, ffn = self._layer_parts(block)
        removal = (1 - head_keep) * heads + (1 - ffn_keep) * ffn
        self.removed += removal
        if block in self.space.groups:
            self.head_keep[block] = head_keep
        if block in self.space.channels:
            self.ffn_keep[block] = ffn_keep
        self.previous = (head_keep, ffn_keep)
        self.t += 1
        if self.t < len(self.blocks):
            return self._observation(), 0.0, False, False, {}
        widths = fit_budget(self.space, self.head_keep, self.ffn_keep)
        terms = self.log.score(widths)
        self.log.episode_done(terms["value"], terms["value"])
        return self._observation(), float(terms["value"]), True, False, {"terms": terms}


@declares(RlOptions)
@WIDTH_ALLOCATORS.register("rl")
@timed_allocation
def rl_widths(context: WidthContext, rl_steps: int = 3000, rl_algo: str = "ppo", rl_w_acc: float = 1.0,
              rl_alpha: float = 0.2, rl_beta: float = 0.6, rl_gamma: float = 0.2, rl_delta: float = 0.4,
              rl_ffn_levels: int = 10, rl_proxy_samples: int = 4, rl_proxy_seqlen: int = 128) -> WidthAllocation:
    """Train a policy (PPO or A2C, seeded) for ``rl_steps`` layer decisions; return the best plan it saw."""
    layers = len(context.space.blocks)
    if rl_steps < layers:
        raise BudgetError(f"--rl-steps {rl_steps} is shorter than one episode ({layers} layer decisions).")
    weights = RewardWeights(w_acc=rl_w_acc, alpha=rl_alpha, beta=rl_beta, gamma=rl_gamma, delta=rl_delta)
    with search_objective(context, weights, rl_proxy_samples, rl_proxy_seqlen) as objective:
        log = SearchLog(objective)
        env = WidthAllocationEnv(context.space, log, context.scores, rl_ffn_levels)
        train_policy(env, rl_algo, rl_steps, context.seed, len(env.blocks), log)
        evaluations = objective.proxy.evaluations
    params = {"rl_steps": rl_steps, "rl_algo": rl_algo, **{f"rl_{k}": v for k, v in weights.model_dump().items()},
              "rl_ffn_levels": rl_ffn_levels, "rl_proxy_samples": rl_proxy_samples,
              "rl_proxy_seqlen": rl_proxy_seqlen}
    return WidthAllocation(log.best_widths, params,
                           {"rl_curve": log.curve, "best_terms": log.best_terms, "proxy_evaluations": evaluations,
                            "proxy_dense_ppl": objective.dense_ppl})
