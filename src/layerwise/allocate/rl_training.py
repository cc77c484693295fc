"""Shared by the RL width searches: the best-plan log and policy training with stable-baselines3."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import gymnasium as gym
import torch
from stable_baselines3 import A2C, PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from tqdm.auto import tqdm

from ..component_options import ComponentOptions, option
from ..cost.analytic import ModelDims
from ..registry import Registry
from .width import WidthContext, Widths
from .width_objective import Objective, RewardWeights, WidthProxy


class RlOptions(ComponentOptions):
    """The RL width searches: training steps, algorithm and the reward's weights."""

    rl_steps: Optional[int] = option("rl/rl-refine: environment steps of training (default 3000 / 320).")
    rl_algo: Optional[str] = option("rl/rl-refine: ppo (default) or a2c.")
    rl_w_acc: Optional[float] = option("rl/rl-refine: weight of the accuracy term (default 1.0).")
    rl_alpha: Optional[float] = option("rl/rl-refine: weight of FLOPs (default 0.2).")
    rl_beta: Optional[float] = option("rl/rl-refine: weight of weight bytes (default 0.6).")
    rl_gamma: Optional[float] = option("rl/rl-refine: weight of peak activation (default 0.2).")
    rl_delta: Optional[float] = option("rl/rl-refine: weight of KV-cache bytes (default 0.4).")


@dataclass
class SearchLog:
    """Every candidate an environment scores passes through here: it keeps the best plan seen and the
    training curve (one point per finished episode)."""

    objective: Objective
    best_value: float = float("-inf")
    best_widths: Widths | None = None
    best_terms: dict[str, float] = field(default_factory=dict)
    curve: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0

    def score(self, widths: Widths) -> dict[str, float]:
        terms = self.objective.terms(widths)
        if terms["value"] > self.best_value:
            self.best_value, self.best_widths, self.best_terms = terms["value"], widths, terms
        return terms

    def episode_done(self, episode_reward: float, last_value: float) -> None:
        self.curve.append({"step": self.steps, "episode_reward": round(episode_reward, 6),
                           "value": round(last_value, 6), "best_value": round(self.best_value, 6)})


def _ppo(env: gym.Env, seed: int, episode_length: int) -> Any:

    return PPO("MlpPolicy", env, n_steps=4 * episode_length, batch_size=episode_length, n_epochs=4,
               gamma=0.99, learning_rate=3e-4, seed=seed, device="cpu", verbose=0)


def _a2c(env: gym.Env, seed: int, episode_length: int) -> Any:

    return A2C("MlpPolicy", env, n_steps=episode_length, gamma=0.99, learning_rate=7e-4, seed=seed,
               device="cpu", verbose=0)


RL_ALGORITHMS: Registry[Callable[[gym.Env, int, int], Any]] = Registry("RL algorithm")
RL_ALGORITHMS.add("ppo", _ppo)
RL_ALGORITHMS.add("a2c", _a2c)


def train_policy(env: gym.Env, algorithm: str, steps: int, seed: int, episode_length: int, log: SearchLog) -> None:
    """Train a seeded policy on ``env`` for ``steps`` environment steps (the searches read ``log``)."""

    class Progress(BaseCallback):
        def _on_training_start(self) -> None:
            self.bar = tqdm(total=steps, desc=f"{algorithm} search", unit="step", disable=None, leave=False)

        def _on_step(self) -> bool:
            log.steps = self.num_timesteps
            self.bar.update(1)
            self.bar.set_postfix(best=f"{log.best_value:.4f}", refresh=False)
            return True

        def _on_training_end(self) -> None:
            self.bar.close()


    model = RL_ALGORITHMS.get(algorithm)(env, seed, episode_length)
    # a logger with no outputs: SB3's default one creates an empty SB3-<time> directory in /tmp on every run
    model.set_logger(Logger(folder=None, output_formats=[]))
    model.learn(total_timesteps=steps, callback=Progress())


def proxy_tokens(calibration: Any, samples: int, seqlen: int) -> torch.Tensor:
    """The search's fixed small token set: the first ``samples`` calibration windows cut to ``seqlen``."""
    tokens = calibration.tokens()
    return tokens[:samples, :seqlen]


def unit_importance(scores: Any, blocks: list[int]) -> tuple[dict[int, float], dict[int, float]]:
    """Each block's summed head and FFN importance over the largest block's (0 where not scored)."""
    heads = {i: float(scores.groups[i].sum()) if i in scores.groups else 0.0 for i in blocks}
    ffn = {i: float(scores.channels[i].sum()) if i in scores.channels else 0.0 for i in blocks}
    return ({i: v / (max(heads.values()) or 1.0) for i, v in heads.items()},
            {i: v / (max(ffn.values()) or 1.0) for i, v in ffn.items()})


@contextlib.contextmanager
def search_objective(context: WidthContext, weights: RewardWeights, samples: int, seqlen: int) -> Iterator[Objective]:
    """The mixed objective over ``context``'s space, its proxy hooks installed for the duration."""
    tokens = proxy_tokens(context.calibration, samples, seqlen)
    batch_size = context.calibration.settings.calib_batch_size
    with WidthProxy(context.model, context.scores, tokens, batch_size) as proxy:
        yield Objective(context.space, proxy, weights, ModelDims.from_model(context.model), context.cost_setting)
