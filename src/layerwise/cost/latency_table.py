"""Measured latency of attention and MLP sublayers in one deployment setting, and the speedup a set of
removals is predicted to give. As SPRINT does, a kind's latency is measured by removing a quarter of
its sublayers and timing the whole model, so per-call overheads that hooks would hide are counted; each probe
is timed in alternating runs with the model itself, so the machine's drift cancels."""

from __future__ import annotations

import copy
import statistics
from typing import Callable, Optional

from pydantic import BaseModel
from torch import nn

from ..config import LatencySetting
from ..errors import LayerwiseError
from ..models.adapter import ModelAdapter, get_adapter
from ..models.loading import LoadedModel
from ..registry import Registry
from .latency import PairedLatency, measure_paired_latency

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
PAIRED_LATENCY: Registry[PairedTiming] = Registry("latency engine")
PAIRED_LATENCY.add("pytorch", lambda reference, model, setting, outtype="f16", embedding_type=None:
                   measure_paired_latency(reference.model, model.model, setting), "torch")


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


def _as_loaded(loaded: LoadedModel | nn.Module) -> LoadedModel:
    if isinstance(loaded, nn.Module):
        return LoadedModel(model=loaded, tokenizer=None, spec="in-memory model", source="in memory")
    return loaded


def measure_latency_table(loaded: LoadedModel | nn.Module, setting: LatencySetting | None = None,
                          engine: str = "pytorch") -> LatencyTable:
    """Time the model against copies without a quarter of its attention (and of its MLP) sublayers, and without
    every sublayer (the floor), each pair of runs alternating, in ``engine`` (``llama.cpp`` times GGUF exports of
    the very same models)."""
    from ..ops.depth import remove_sublayers

    setting = setting or LatencySetting()
    loaded = _as_loaded(loaded)
    adapter = get_adapter(loaded.model)
    dense_ms: list[float] = []

    def without(names: list[str]) -> PairedLatency:
        pair = paired_latency(loaded, changed_copy(loaded, lambda model: remove_sublayers(model, names)), setting,
                              engine)
        dense_ms.append(pair.reference.total_ms)
        return pair

    per_kind: dict[str, float] = {}
    probes: dict[str, list[str]] = {}
    counts: dict[str, int] = {}
    for kind in KINDS:
        names = [s.name for s in adapter.all_sublayers() if s.kind == kind]
        count = max(1, len(names) // 4)
        # the last sublayers but one, like SPRINT's probe; any equal-shape sublayers would do
        probes[kind] = names[-count - 1 : -1] if len(names) > count else names[:count]
        per_kind[kind] = max(without(probes[kind]).saved_ms["total"], 0.0) / len(probes[kind])
        counts[kind] = len(names)
    try:  # llama.cpp's GGUF files need a decoder block with weights: then the whole model is the bound
        everything = without([s.name for s in adapter.all_sublayers()]).saved_ms["total"]
    except LayerwiseError:
        everything = None
    full = statistics.median(dense_ms)
    # what stays (embedding, norms, head), from the pairs' own difference: drift between pairs cancels
    floor = None if everything is None else full - min(max(everything, 0.0), full)
    scale = consistent_scale(sum(per_kind[kind] * counts[kind] for kind in KINDS), full - (floor or 0.0))
    return LatencyTable(setting=setting, total_ms=round(full, 3),
                        sublayer_ms={kind: round(ms * scale, 4) for kind, ms in per_kind.items()},
                        probe_removed={kind: len(probe) for kind, probe in probes.items()},
                        engine=latency_engine(engine), floor_ms=None if floor is None else round(floor, 3),
                        scaled=round(scale, 4))


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
    """Time the model against copies with one KV group fewer in every attention block and with every FFN at half
    width, each pair of runs alternating."""
    from ..ops.structured import slice_attention, slice_mlp

    setting = setting or LatencySetting()

    def one_group_fewer(adapter: ModelAdapter, block: int) -> int:
        groups = adapter.head_geometry(block).num_kv_heads
        if groups > 1:
            slice_attention(adapter, block, list(range(groups - 1)))
        return int(groups > 1)

    def half_width(adapter: ModelAdapter, block: int) -> int:
        width = adapter.ffn_width(block)
        slice_mlp(adapter, block, list(range(width - width // 2)))
        return width // 2

    deltas, removed, dense_ms = {}, {}, []
    for kind, cut, sublayer in (("groups", one_group_fewer, "attention"), ("channels", half_width, "mlp")):
        deltas[kind], removed[kind] = _saved_when_sliced(loaded, setting, engine, sublayer, cut, dense_ms)
    return WidthLatencyTable(setting=setting, total_ms=_dense_ms(loaded, setting, engine, dense_ms),
                             ms_per_group=round(deltas["groups"] / max(1, removed["groups"]), 6),
                             ms_per_channel=round(deltas["channels"] / max(1, removed["channels"]), 8),
                             probe_removed=removed, engine=latency_engine(engine))


def _saved_when_sliced(loaded: LoadedModel, setting: LatencySetting, engine: str, kind: str,
                       cut: Callable[[ModelAdapter, int], int], dense_ms: list[float]) -> tuple[float, int]:
    """Time a copy of the model with ``cut(adapter, block)`` applied to every block whose ``kind`` sublayer is
    present against the model, in alternating runs; ``cut`` returns what it counts as removed there, and the
    dense side's median goes to ``dense_ms``. Returns (ms saved, total counted), (0, 0) when nothing was cut."""
    counted = [0]

    def change(model: nn.Module) -> None:
        adapter = get_adapter(model)
        counted[0] = sum(cut(adapter, block) for block in range(adapter.num_blocks)
                         if not (adapter.attention(block) if kind == "attention" else adapter.mlp(block)).removed)

    probe = changed_copy(loaded, change)
    if not counted[0]:
        return 0.0, 0
    pair = paired_latency(loaded, probe, setting, engine)
    dense_ms.append(pair.reference.total_ms)
    return max(pair.saved_ms["total"], 0.0), counted[0]


def _dense_ms(loaded: LoadedModel, setting: LatencySetting, engine: str, dense_ms: list[float]) -> float:
    """The dense side's median over a table's pairs (timed alone when no probe changed anything)."""
    if not dense_ms:
        dense_ms.append(paired_latency(loaded, loaded, setting, engine).reference.total_ms)
    return round(statistics.median(dense_ms), 3)


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
    """Time the model against a copy per (kind, kept) with every block's attention keeping ``kept`` KV groups or
    every MLP ``kept`` channels, in alternating runs (``levels``: kind -> the kept counts to time; the dense width
    is skipped)."""
    from ..ops.structured import slice_attention, slice_mlp

    setting = setting or LatencySetting()

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
    dense_ms: list[float] = []
    for kind, counts in levels.items():
        for kept in counts:
            ms, sliced = _saved_when_sliced(loaded, setting, engine, kind, keeping(kind, kept), dense_ms)
            if sliced:
                saved[kind][kept] = round(ms / sliced, 6)
    return LevelLatencyTable(setting=setting, total_ms=_dense_ms(loaded, setting, engine, dense_ms), saved_ms=saved,
                             engine=latency_engine(engine))
