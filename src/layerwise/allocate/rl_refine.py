"""``rl-refine`` (RL-Refine): start from ``adapt``'s allocation; each action moves one KV group or one
block of FFN channels from one layer to another, so the pruned total is the same after every step; the
reward is the step's improvement of the mixed objective; an episode is ``refine_moves`` moves from the
start. The best plan seen (the start included) is returned."""

from __future__ import annotations

from typing import Optional

import gymnasium as gym
import numpy as np

from ..component_options import declares, option
from ..errors import BudgetError
from .adapt import AdaptOptions, adapt_keep_fractions
from .rl_training import RlOptions, SearchLog, search_objective, train_policy
from .width import WIDTH_ALLOCATORS, WidthAllocation, WidthContext, Widths, WidthSpace, fit_budget, timed_allocation
from .width_objective import RewardWeights

KINDS = ("groups", "channels")
INVALID_MOVE_PENALTY = 1e-3  # a move that is impossible (same layer, empty source, full target) changes nothing


class WidthRefineEnv(gym.Env):
    """Observation: every eligible layer's kept fraction of heads and of FFN, and the episode's progress.
    Action: (kind, source layer, target layer) over the eligible layers."""

    metadata = {"render_modes": []}

    def __init__(self, space: WidthSpace, log: SearchLog, start: Widths, moves: int = 8, block: int = 64) -> None:
        self.space, self.log, self.start, self.moves, self.block = space, log, start, moves, block
        self.blocks = space.blocks
        n = len(self.blocks)
        self.action_space = gym.spaces.MultiDiscrete([2, n, n])
        self.observation_space = gym.spaces.Box(0.0, 1.0, (2 * n + 1,), dtype=np.float32)
        self.current, self.k, self.value, self.episode_reward = start, 0, 0.0, 0.0

    def _observation(self) -> np.ndarray:
        heads = [self.current.groups[b] / self.space.groups[b] if b in self.space.groups else 1.0 for b in self.blocks]
        ffn = [self.current.channels[b] / self.space.channels[b] if b in self.space.channels else 1.0
               for b in self.blocks]
        return np.asarray(heads + ffn + [self.k / self.moves], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.current, self.k, self.episode_reward = self.start, 0, 0.0
        self.value = self.log.score(self.start)["value"]
        return self._observation(), {}

    def move(self, kind: str, source: int, target: int) -> Widths | None:
        """The allocation after moving one unit of ``kind`` from ``source`` to ``target``, or None if impossible."""
        table, dense = (self.current.groups, self.space.groups) if kind == "groups" else \
                       (self.current.channels, self.space.channels)
        amount, least = (1, 1) if kind == "groups" else (self.block, self.space.multiple)
        if source == target or source not in table or target not in table:
            return None
        if table[source] - amount < least or table[target] + amount > dense[target]:
            return None
        return self.current.moved(kind, source, target, amount)

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        kind = KINDS[int(action[0])]
        moved = self.move(kind, self.blocks[int(action[1])], self.blocks[int(action[2])])
        if moved is None:
            reward = -INVALID_MOVE_PENALTY
        else:
            value = self.log.score(moved)["value"]
            reward, self.current, self.value = value - self.value, moved, value
        self.k += 1
        self.episode_reward += reward
        done = self.k >= self.moves
        if done:
            self.log.episode_done(self.episode_reward, self.value)
        return self._observation(), float(reward), False, done, {}


class RefineOptions(RlOptions, AdaptOptions):
    """RL-Refine: the RL options, its moves, and the adaptive start's amplitude."""

    refine_moves: Optional[int] = option("rl-refine: moves per episode (default 8).")
    refine_block: Optional[int] = option("rl-refine: FFN channels moved at once (default 64).")


@declares(RefineOptions)
@WIDTH_ALLOCATORS.register("rl-refine", "rl_refine")
@timed_allocation
def rl_refine_widths(context: WidthContext, rl_steps: int = 320, rl_algo: str = "ppo", rl_w_acc: float = 1.0,
                     rl_alpha: float = 0.2, rl_beta: float = 0.6, rl_gamma: float = 0.2, rl_delta: float = 0.4,
                     refine_moves: int = 8, refine_block: int = 64, adapt_amplitude: float = 0.2,
                     rl_proxy_samples: int = 4, rl_proxy_seqlen: int = 128) -> WidthAllocation:
    """Refine ``adapt``'s allocation by sum-preserving moves chosen by a policy (PPO or A2C, seeded)."""
    space = context.space
    if rl_steps < refine_moves:
        raise BudgetError(f"--rl-steps {rl_steps} is shorter than one episode ({refine_moves} moves).")
    if refine_block % space.multiple:
        raise BudgetError(f"--refine-block {refine_block} must be a multiple of the channel rounding {space.multiple}.")
    keep, _ = adapt_keep_fractions(context, adapt_amplitude)
    start = fit_budget(space, {i: keep[i] for i in space.groups}, {i: keep[i] for i in space.channels})
    weights = RewardWeights(w_acc=rl_w_acc, alpha=rl_alpha, beta=rl_beta, gamma=rl_gamma, delta=rl_delta)
    with search_objective(context, weights, rl_proxy_samples, rl_proxy_seqlen) as objective:
        log = SearchLog(objective)
        start_terms = log.score(start)
        env = WidthRefineEnv(space, log, start, refine_moves, refine_block)
        train_policy(env, rl_algo, rl_steps, context.seed, refine_moves, log)
        evaluations = objective.proxy.evaluations
    params = {"rl_steps": rl_steps, "rl_algo": rl_algo, **{f"rl_{k}": v for k, v in weights.model_dump().items()},
              "refine_moves": refine_moves, "refine_block": refine_block, "adapt_amplitude": adapt_amplitude,
              "rl_proxy_samples": rl_proxy_samples, "rl_proxy_seqlen": rl_proxy_seqlen}
    return WidthAllocation(log.best_widths, params,
                           {"rl_curve": log.curve, "best_terms": log.best_terms, "start_terms": start_terms,
                            "proxy_evaluations": evaluations, "proxy_dense_ppl": objective.dense_ppl})
