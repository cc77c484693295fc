"""Measured latency of attention and MLP sublayers in one deployment setting, and the speedup a set of
removals is predicted to give. As SPRINT does, a kind's latency is measured by removing a quarter of
its sublayers and timing the whole model, so per-call overheads that hooks would hide are counted."""

from __future__ import annotations

from typing import Callable

from pydantic import BaseModel
from torch import nn

from ..config import LatencySetting
from ..errors import LayerwiseError
from ..models.adapter import ModelAdapter, get_adapter
from ..models.loading import LoadedModel
from ..registry import Registry
from .latency import measure_latency

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


# engine -> the whole-model latency (ms, prompt + generation) of a loaded model as it is now
ModelLatency = Callable[[LoadedModel, LatencySetting], float]
MODEL_LATENCY: Registry[ModelLatency] = Registry("latency engine")
MODEL_LATENCY.add("pytorch", lambda loaded, setting: measure_latency(loaded.model, setting).total_ms, "torch")


def measure_latency_table(loaded: LoadedModel | nn.Module, setting: LatencySetting | None = None,
                          engine: str = "pytorch") -> LatencyTable:
    """Time the model whole, then without a quarter of its attention (and of its MLP) sublayers, in ``engine``
    (``llama.cpp`` times GGUF exports of the very same models)."""
    from ..backends.depth import temporarily_removed

    from .. import engines  # noqa: F401  (registers the engines' latency functions)

    setting = setting or LatencySetting()
    if isinstance(loaded, nn.Module):
        loaded = LoadedModel(model=loaded, tokenizer=None, spec="in-memory model", source="in memory")
    total_ms = MODEL_LATENCY.get(engine)
    model = loaded.model
    adapter = get_adapter(model)
    before = total_ms(loaded, setting)
    reduced: dict[str, float] = {}
    probes: dict[str, list[str]] = {}
    for kind in KINDS:
        names = [s.name for s in adapter.all_sublayers() if s.kind == kind]
        count = max(1, len(names) // 4)
        # the last sublayers but one, like SPRINT's probe; any equal-shape sublayers would do
        probe = names[-count - 1 : -1] if len(names) > count else names[:count]
        with temporarily_removed(model, probe):
            reduced[kind] = total_ms(loaded, setting)
        probes[kind] = probe
    counts = {kind: sum(1 for s in adapter.all_sublayers() if s.kind == kind) for kind in KINDS}
    floor = _floor_ms(loaded, setting, total_ms)
    full = (before + total_ms(loaded, setting)) / 2  # timed before and after the probes: drift cancels
    per_kind = {kind: max(full - reduced[kind], 0.0) / len(probes[kind]) for kind in KINDS}
    scale = consistent_scale(sum(per_kind[kind] * counts[kind] for kind in KINDS), full - (floor or 0.0))
    return LatencyTable(setting=setting, total_ms=round(full, 3),
                        sublayer_ms={kind: round(ms * scale, 4) for kind, ms in per_kind.items()},
                        probe_removed={kind: len(probe) for kind, probe in probes.items()},
                        engine=MODEL_LATENCY.canonical(engine), floor_ms=None if floor is None else round(floor, 3),
                        scaled=round(scale, 4))


def _floor_ms(loaded: LoadedModel, setting: LatencySetting, total_ms: ModelLatency) -> float | None:
    """The model timed with every sublayer removed; None where the engine cannot run such a model (llama.cpp's
    GGUF files need a decoder block with weights), and then the whole model is the bound."""
    from ..backends.depth import temporarily_removed

    with temporarily_removed(loaded.model, [s.name for s in get_adapter(loaded.model).all_sublayers()]):
        try:
            return total_ms(loaded, setting)
        except LayerwiseError:
            return None


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


def measure_width_latency_table(loaded: LoadedModel, setting: LatencySetting | None = None,
                                engine: str = "pytorch") -> WidthLatencyTable:
    """Time the model whole, then copies with one KV group fewer in every attention block and with every FFN
    at half width."""
    from ..backends.structured import slice_attention, slice_mlp

    from .. import engines  # noqa: F401  (registers the engines' latency functions)

    setting = setting or LatencySetting()
    total_ms = MODEL_LATENCY.get(engine)
    full = total_ms(loaded, setting)

    def one_group_fewer(adapter: ModelAdapter, block: int) -> int:
        groups = adapter.head_geometry(block).num_kv_heads
        if groups > 1:
            slice_attention(adapter, block, list(range(groups - 1)))
        return int(groups > 1)

    def half_width(adapter: ModelAdapter, block: int) -> int:
        width = adapter.ffn_width(block)
        slice_mlp(adapter, block, list(range(width - width // 2)))
        return width // 2

    deltas, removed = {}, {}
    for kind, cut, sublayer in (("groups", one_group_fewer, "attention"), ("channels", half_width, "mlp")):
        deltas[kind], removed[kind] = _saved_when_sliced(loaded, setting, total_ms, full, sublayer, cut)
    return WidthLatencyTable(setting=setting, total_ms=full,
                             ms_per_group=round(deltas["groups"] / max(1, removed["groups"]), 6),
                             ms_per_channel=round(deltas["channels"] / max(1, removed["channels"]), 8),
                             probe_removed=removed, engine=MODEL_LATENCY.canonical(engine))


def _saved_when_sliced(loaded: LoadedModel, setting: LatencySetting, total_ms: ModelLatency, full: float,
                       kind: str, cut: Callable[[ModelAdapter, int], int]) -> tuple[float, int]:
    """Time a copy of the model with ``cut(adapter, block)`` applied to every block whose ``kind`` sublayer is
    present; ``cut`` returns what it counts as removed there. Returns (ms saved, total counted), (0, 0) when
    nothing was cut."""
    import copy

    probe = copy.copy(loaded)
    probe.model = copy.deepcopy(loaded.model)
    adapter = get_adapter(probe.model)
    counted = sum(cut(adapter, block) for block in range(adapter.num_blocks)
                  if not (adapter.attention(block) if kind == "attention" else adapter.mlp(block)).removed)
    saved = max(full - total_ms(probe, setting), 0.0) if counted else 0.0
    return saved, counted


class LevelLatencyTable(BaseModel):
    """What one sublayer saves at each width level, per kind: measured by timing the model with every sublayer of
    that kind at that level (as SPRINT times removals, the whole model, so per-call overheads count), in one
    setting and engine. ``saved_ms[kind][kept]`` is per sublayer; removals come from a ``LatencyTable``."""

    setting: LatencySetting
    total_ms: float
    saved_ms: dict[str, dict[int, float]]
    engine: str = "pytorch"


def measure_level_latency_table(loaded: LoadedModel, levels: dict[str, list[int]], setting: LatencySetting | None = None,
                                engine: str = "pytorch") -> LevelLatencyTable:
    """Time the model whole, then a copy per (kind, kept) with every block's attention keeping ``kept`` KV groups or
    every MLP ``kept`` channels (``levels``: kind -> the kept counts to time; the dense width is skipped)."""
    from ..backends.structured import slice_attention, slice_mlp

    from .. import engines  # noqa: F401  (registers the engines' latency functions)

    setting = setting or LatencySetting()
    total_ms = MODEL_LATENCY.get(engine)
    full = total_ms(loaded, setting)

    def keeping(kind: str, kept: int) -> Callable[[ModelAdapter, int], int]:
        def cut(adapter: ModelAdapter, block: int) -> int:  # counts the sublayers it narrows
            if kind == "attention" and adapter.head_geometry(block).num_kv_heads > kept:
                slice_attention(adapter, block, list(range(kept)))
                return 1
            if kind == "mlp" and adapter.ffn_width(block) > kept:
                slice_mlp(adapter, block, list(range(kept)))
                return 1
            return 0
        return cut

    saved: dict[str, dict[int, float]] = {kind: {} for kind in levels}
    for kind, counts in levels.items():
        for kept in counts:
            ms, sliced = _saved_when_sliced(loaded, setting, total_ms, full, kind, keeping(kind, kept))
            if sliced:
                saved[kind][kept] = round(ms / sliced, 6)
    return LevelLatencyTable(setting=setting, total_ms=full, saved_ms=saved, engine=MODEL_LATENCY.canonical(engine))
