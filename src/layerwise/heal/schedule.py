"""The learning-rate schedule of healing: linear warm-up, then cosine decay to a floor, over optimiser steps.
One schedule may span several healing stages (Adapt-Accel), as Adapt-Pruner's scripts carry their step count
from stage to stage."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import HealSetting


@dataclass(frozen=True)
class Schedule:
    """Warm-up + cosine over ``total_steps``; ``lr(step)`` for any global step (past the end: the floor)."""

    total_steps: int
    warmup_steps: int
    peak_lr: float
    min_lr: float

    @classmethod
    def for_setting(cls, setting: HealSetting, total_steps: int | None = None) -> "Schedule":
        """The schedule of ``setting`` over its own steps, or over ``total_steps`` when stages share one."""
        total = total_steps if total_steps is not None else setting.steps
        return cls(total_steps=total, warmup_steps=int(round(setting.warmup * total)), peak_lr=setting.lr,
                   min_lr=setting.lr * setting.min_lr_ratio)

    def lr(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))
