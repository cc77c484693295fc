"""``automp-rl`` (AutoMP-RL): a small MLP policy reads each decoder linear's activation statistics (mean |x|,
max |x|, std, kurtosis from the Profile) with its depth and projection type, and outputs a categorical
distribution over the bit choices. REINFORCE with an entropy bonus and normalised advantage (a running
mean/std of rewards as baseline) maximises ``−α·(PPL/PPL_base − 1) + β·memory saving`` (saving = 1 − average
bits / 16). Candidates are scored on a small fixed token set with per-linear weights precomputed once per
bit width (a level bank), so an episode only swaps tensors. With ``--avg-bits`` each sampled configuration
is projected onto the budget (``fit_bits``, by the same per-linear sensitivity as ``greedy``) before it is
scored; the gradient follows the sampled choices, the projection being part of the environment.
``--seeds N`` trains N policies (seeds s, s+1, …) and keeps the best configuration of any; each seed's final
answer is recorded for the report's box plot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from ..component_options import declares, option
from ..errors import BudgetError
from ..evaluate.perplexity import token_set_perplexity
from ..models.discovery import block_index, find_blocks
from ..models.swaps import SwapLog
from .bits import (
    ACTIVATION_STATISTICS,
    BIT_ALLOCATORS,
    BitAllocation,
    BitContext,
    SensitivityOptions,
    budget_bits,
    check_bit_budget,
    fit_bits,
    linear_statistics,
    sensitivities,
)

ROLES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def automp_reward(ppl: float, base_ppl: float, avg: float, alpha: float, beta: float) -> float:
    """−α·(PPL/PPL_base − 1) + β·(1 − average bits / 16)."""
    return -alpha * (ppl / base_ppl - 1.0) + beta * (1.0 - avg / 16.0)


def linear_states(context: BitContext) -> torch.Tensor:
    """One row per linear: log-scaled, standardised activation statistics, relative depth, role one-hot."""

    statistics = linear_statistics(context)
    prefix, blocks = find_blocks(context.model)
    rows = []
    for name in context.linears:
        values = [statistics[name][key] for key in ACTIVATION_STATISTICS]
        stats = [math.log1p(abs(v)) * (1 if v >= 0 else -1) for v in values]
        depth = block_index(name, prefix) / max(1, len(blocks) - 1)
        role = [1.0 if name.endswith(r) else 0.0 for r in ROLES]
        rows.append(stats + [depth] + role)
    states = torch.tensor(rows, dtype=torch.float32)
    columns = len(ACTIVATION_STATISTICS)
    mean, std = states[:, :columns].mean(0), states[:, :columns].std(0).clamp_min(1e-6)
    states[:, :columns] = (states[:, :columns] - mean) / std
    return states


class RoundedWeights:
    """Per linear and level, the rounded weight, computed once; ``use`` swaps a configuration's in (undoing the
    previous one), ``restore`` puts the dense weights back."""

    def __init__(self, context: BitContext) -> None:
        self.linears = context.linears
        self.edits = SwapLog()
        self.levels: dict[str, dict] = {}
        for name in tqdm(self.linears, desc="level bank", unit="linear", disable=None, leave=False):
            weight = self.linears[name].weight.data
            self.levels[name] = {level: context.round_trip(name, level).to(weight.dtype)
                                 for level in context.options(name)}

    def use(self, bits: dict) -> None:
        self.edits.undo()
        for name, level in bits.items():
            self.edits.set(self.linears[name].weight, "data", self.levels[name][level])

    def restore(self) -> None:
        self.edits.undo()


@dataclass
class Episode:
    index: int
    bits: dict
    avg_bits: float
    ppl: float
    reward: float


@dataclass
class Search:
    """What every seed of a search shares: states, level bank, scoring tokens and the budget projection."""

    context: BitContext
    states: torch.Tensor
    bank: RoundedWeights
    tokens: torch.Tensor
    base_ppl: float
    errors: dict[str, dict] | None
    budget: float | None = None

    def score(self, bits: dict) -> float:
        self.bank.use(bits)
        with self.context.rounding() as hooks:
            if hooks is not None:
                hooks.levels.update(bits)
            return token_set_perplexity(self.context.model, self.tokens,
                                        self.context.calibration.settings.calib_batch_size)


class AutompOptions(SensitivityOptions):
    """AutoMP-RL: episodes, the reward's weights, candidate scoring and independent seeds."""

    episodes: Optional[int] = option("automp-rl: sampled configurations (default 300).")
    mp_alpha: Optional[float] = option("automp-rl: weight of the perplexity term (default 0.7).", param="alpha")
    mp_beta: Optional[float] = option("automp-rl: weight of the memory saving (default 2.0).", param="beta")
    eval_samples: Optional[int] = option("automp-rl: calibration windows of 128 tokens scoring each candidate "
                                         "(default 4).")
    seeds: Optional[int] = option("automp-rl: independent searches (seed, seed+1, ...); the best configuration of "
                                  "any is kept (default 1).")


@declares(AutompOptions)
@BIT_ALLOCATORS.register("automp-rl", "automp_rl")
def automp_rl_bits(context: BitContext, avg_bits: float | None = None, episodes: int = 300, alpha: float = 0.7,
                   beta: float = 2.0, learning_rate: float = 2e-3, entropy_coef: float = 0.01,
                   eval_samples: int = 4, eval_seqlen: int = 128, seeds: int = 1,
                   sensitivity: str = "kl", max_bits: float | None = None) -> BitAllocation:
    """Train the policy for ``episodes`` sampled configurations with each of ``seeds`` seeds (the run's seed
    and the next ones); return the best-reward configuration over all seeds (the best-PPL one is kept too)."""
    check_bit_budget(context, avg_bits)
    if seeds < 1 or episodes < 1:
        raise BudgetError("automp-rl needs --episodes and --seeds of at least 1.")
    tokens = context.calibration.tokens()[:eval_samples, :eval_seqlen]
    base_ppl = token_set_perplexity(context.model, tokens, context.calibration.settings.calib_batch_size)
    budget = budget_bits(context, avg_bits, max_bits)
    errors = sensitivities(context, sensitivity) if budget is not None else None
    search = Search(context, linear_states(context), RoundedWeights(context), tokens, base_ppl, errors, budget)
    runs = []
    try:
        for offset in range(seeds):
            with torch.random.fork_rng():  # seeded sampling without touching the caller's random state
                torch.manual_seed(context.seed + offset)
                runs.append(_train(search, episodes, alpha, beta, learning_rate, entropy_coef))
    finally:
        search.bank.restore()
    chosen = max(range(seeds), key=lambda k: max(e.reward for e in runs[k]))
    history = runs[chosen]
    best = max(history, key=lambda e: e.reward)
    best_ppl = min(history, key=lambda e: e.ppl)
    params = {"episodes": episodes, "alpha": alpha, "beta": beta, "learning_rate": learning_rate,
              "entropy_coef": entropy_coef, "eval_samples": eval_samples, "eval_seqlen": eval_seqlen,
              "avg_bits": avg_bits, "seeds": seeds, "sensitivity": sensitivity}
    details = {"curve": _curve(history), "base_proxy_ppl": base_ppl, "best_reward_episode": best.index,
               "best_ppl_episode": best_ppl.index, "best_ppl_bits": best_ppl.bits, "chosen_seed": context.seed + chosen,
               "seeds": [_seed_summary(context.seed + k, run) for k, run in enumerate(runs)]}
    return BitAllocation(best.bits, params, details)


def _curve(history: list[Episode]) -> list[dict]:
    return [{"episode": e.index, "ppl": round(e.ppl, 4), "avg_bits": round(e.avg_bits, 4),
             "memory_saving": round(1 - e.avg_bits / 16, 6), "reward": round(e.reward, 6)} for e in history]


def _seed_summary(seed: int, history: list[Episode]) -> dict:
    """A seed's final answer: its best-reward configuration's proxy PPL, bits and reward."""
    best = max(history, key=lambda e: e.reward)
    return {"seed": seed, "proxy_ppl": round(best.ppl, 4), "avg_bits": round(best.avg_bits, 4),
            "reward": round(best.reward, 6), "best_episode": best.index,
            "best_proxy_ppl": round(min(e.ppl for e in history), 4)}


def _train(search: Search, episodes: int, alpha: float, beta: float, learning_rate: float,
           entropy_coef: float) -> list[Episode]:
    """One seed's REINFORCE run; every sampled (projected) configuration as an Episode. The policy picks among
    the run's choices; a choice a linear cannot store becomes the level llama.cpp would store instead."""
    context, states = search.context, search.states
    names = list(context.linears)
    choices = list(context.choices)
    policy = nn.Sequential(nn.Linear(states.shape[1], 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                           nn.Linear(64, len(choices)))
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    history: list[Episode] = []
    mean, var = 0.0, 1.0
    for index in tqdm(range(episodes), desc="automp-rl", unit="episode", disable=None, leave=False):
        distribution = torch.distributions.Categorical(logits=policy(states))
        sample = distribution.sample()
        bits = {name: context.stored(name, choices[int(k)]) for name, k in zip(names, sample)}
        if search.budget is not None:
            bits = fit_bits(bits, context, search.errors, search.budget)
        ppl = search.score(bits)
        avg = context.average_bits(bits)
        reward = automp_reward(ppl, search.base_ppl, avg, alpha, beta)
        history.append(Episode(index, bits, avg, ppl, reward))
        mean, var = (reward, 1.0) if index == 0 else (0.9 * mean + 0.1 * reward,
                                                       0.9 * var + 0.1 * (reward - mean) ** 2)
        advantage = (reward - mean) / math.sqrt(var + 1e-8)
        # REINFORCE on what was sampled: the budget projection is part of the environment, so crediting the
        # projected configuration's reward to the sampled actions is unbiased for the composite policy (crediting
        # it to the projected actions, which the policy did not draw, biased the gradient)
        loss = -advantage * distribution.log_prob(sample).sum() - entropy_coef * distribution.entropy().sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return history
