"""Measured latency of attention and MLP sublayers in one deployment setting, and the speedup a set of
removals is predicted to give. As SPRINT does, a kind's latency is measured by removing a quarter of
its sublayers and timing the whole model, so per-call overheads that hooks would hide are counted; each probe
is timed in alternating runs with the model itself, so the machine's drift cancels."""

from __future__ import annotations

import copy
from typing import Callable, Optional

from pydantic import BaseModel
from torch import nn

from ..config import LatencySetting
from ..models.loading import LoadedModel
from ..registry import Registry
from .latency import PairedLatency

KINDS = ("attention", "mlp")


class LatencyTable(BaseModel):
    """Whole-model latency and the latency one sublayer of each kind adds, in the same setting and engine."""

    setting: LatencySetting
    total_ms: float
    sublayer_ms: dict[str, float]
    probe_removed: dict[str, int]
    engine: str = "pytorch"
    # the model with every sublayer removed (embedding, norms, head): what no removal can save
    floor_ms: float | None = None
    # the factor the per-sublayer times were scaled by so that removing every sublayer saves no more than
    # total_ms - floor_ms (1.0: the timings were consistent as measured; below 1: noise had inflated them)
    scaled: float = 1.0

    def saved_ms(self, kinds: list[str]) -> float:
        return sum(self.sublayer_ms[kind] for kind in kinds)

    def predicted_speedup(self, removed_kinds: list[str]) -> float:
        """Dense latency over predicted latency once sublayers of ``removed_kinds`` are gone."""
        remaining = max(self.total_ms - self.saved_ms(removed_kinds), 1e-9)
        return self.total_ms / remaining


# engine -> two models timed in alternating runs, the reference first (a pair's two runs drift alike, separate
# measurements do not); an engine that runs files exports both with float linears at ``outtype`` and the token
# embedding at ``embedding_type`` (GGUF linears keep their own types)
PairedTiming = Callable[[LoadedModel, LoadedModel, LatencySetting, str, Optional[str]], PairedLatency]
PAIRED_LATENCY: Registry[PairedTiming] = Registry("latency engine")  # each engine's module registers its own


def latency_engine(name: str) -> str:
    """The registered name of the engine ``name`` times in (the engines register theirs when the package is
    imported)."""
    return PAIRED_LATENCY.canonical(name)


def paired_latency(reference: LoadedModel, model: LoadedModel, setting: LatencySetting, engine: str = "pytorch",
                   outtype: str = "f16", embedding_type: str | None = None) -> PairedLatency:
    """``reference`` and ``model`` timed in alternating runs in ``engine``: every table and speed guard times so."""
    return PAIRED_LATENCY.get(latency_engine(engine))(reference, model, setting, outtype, embedding_type)


def changed_copy(loaded: LoadedModel, change: Callable[[nn.Module], object]) -> LoadedModel:
    """A deep copy of ``loaded`` with ``change`` applied to its model (the probe a table or guard times)."""
    probe = copy.copy(loaded)
    probe.model = copy.deepcopy(loaded.model)
    change(probe.model)
    return probe


def consistent_scale(saved_by_everything: float, removable: float) -> float:
    """The factor that keeps a table honest: removing every sublayer cannot save more than the time they take
    (the whole model less what stays: embedding, norms, head). Timings of a small or busy model can claim
    more; then every entry shrinks by the same factor, and the table records it."""
    if saved_by_everything <= 0.0 or saved_by_everything <= removable:
        return 1.0
    return max(removable, 0.0) / saved_by_everything


class WidthLatencyTable(BaseModel):
    """Whole-model latency and what one KV group and one FFN channel cost, summed over the blocks, measured
    in one setting and engine by slicing every block a little (a linear model of width, like the FLOP count,
    but timed where the model runs)."""

    setting: LatencySetting
    total_ms: float
    ms_per_group: float
    ms_per_channel: float
    probe_removed: dict[str, int]
    engine: str = "pytorch"

    def predicted_speedup(self, removed_groups: int, removed_channels: int) -> float:
        saved = removed_groups * self.ms_per_group + removed_channels * self.ms_per_channel
        return self.total_ms / max(self.total_ms - saved, 1e-9)


class LevelLatencyTable(BaseModel):
    """What one sublayer saves at each width level, per kind: measured by timing the model with every sublayer of
    that kind at that level (as SPRINT times removals, the whole model, so per-call overheads count), in one
    setting and engine. ``saved_ms[kind][kept]`` is per sublayer; removals come from a ``LatencyTable``."""

    setting: LatencySetting
    total_ms: float
    saved_ms: dict[str, dict[int, float]]
    engine: str = "pytorch"
