"""The Profile: per-linear calibration statistics, computed once per (model, data, settings) and cached."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ..cache import atomic_torch_save, cache_dir, stable_hash, torch_load_or_none
from .blockwise import BlockwiseRunner, block_linears
from .stats import InputStats, attach_input_stats

PROFILE_VERSION = 1


@dataclass
class Profile:
    """Input statistics of every decoder linear on the calibration set, plus how they were made."""

    units: dict[str, InputStats]
    settings: dict[str, Any] = field(default_factory=dict)

    def feature_norms(self, unit: str) -> torch.Tensor:
        return self.units[unit].feature_norms()

    def to_state(self) -> dict[str, Any]:
        return {"version": PROFILE_VERSION, "settings": self.settings,
                "units": {name: asdict(stats) for name, stats in self.units.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "Profile":
        return cls(units={n: InputStats(**s) for n, s in state["units"].items()}, settings=state["settings"])


@torch.no_grad()
def compute_profile(model: nn.Module, calibration: torch.Tensor, batch_size: int = 8,
                    storage: str | None = None) -> Profile:
    """Run ``calibration`` ([n, seqlen] ids) block by block and collect every linear's input statistics."""
    runner = BlockwiseRunner(model, calibration, batch_size, storage)
    stats: dict[str, InputStats] = {}
    for index in runner.progress("profile"):
        handles = attach_input_stats(block_linears(runner, index), stats)
        try:
            outputs = runner.forward(index)
        finally:
            for handle in handles:
                handle.remove()
        runner.advance(outputs)
    return Profile(units=stats)


def load_or_compute_profile(model: nn.Module, calibration: torch.Tensor, key_parts: dict[str, Any],
                            batch_size: int = 8) -> tuple[Profile, bool]:
    """The cached profile for ``key_parts`` (model fingerprint, data, settings) or a freshly computed one."""
    key = stable_hash({**key_parts, "version": PROFILE_VERSION}, length=24)
    path = cache_dir("profiles") / f"{key}.pt"
    state = torch_load_or_none(path)
    if isinstance(state, dict) and state.get("version") == PROFILE_VERSION:
        return Profile.from_state(state), True
    profile = compute_profile(model, calibration, batch_size)
    profile.settings = dict(key_parts)
    atomic_torch_save(profile.to_state(), path)
    return profile, False
