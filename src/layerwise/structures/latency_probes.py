"""The latency tables measured: probes built with the ops they time (sublayers removed, blocks sliced, linears
stored as empty GGUF linears of their types), each timed in alternating runs with the model in one engine. The
tables' types and what they predict live in ``cost``; building a probe needs ``ops``, so measuring sits above
them, beside the structures that plan with the tables."""

from __future__ import annotations

import statistics
from typing import Callable, Iterable, Optional

from torch import nn

from ..config import LatencySetting
from ..cost.latency import PairedLatency
from ..cost.latency_table import (
    KINDS,
    LatencyTable,
    LevelLatencyTable,
    WidthLatencyTable,
    changed_copy,
    consistent_scale,
    latency_engine,
    paired_latency,
)
from ..cost.typed_latency import TypedLevelLatencyTable, typed_paired_latency
from ..errors import LayerwiseError
from ..models import LoadedModel, decoder_linears, get_adapter
from ..models.adapter import ModelAdapter
from ..ops.depth import remove_sublayers
from ..ops.gguf_quant import GGUFLinear
from ..ops.structured import slice_attention, slice_mlp


def _as_loaded(loaded: LoadedModel | nn.Module) -> LoadedModel:
    if isinstance(loaded, nn.Module):
        return LoadedModel(model=loaded, tokenizer=None, spec="in-memory model", source="in memory")
    return loaded


def measure_latency_table(loaded: LoadedModel | nn.Module, setting: LatencySetting | None = None,
                          engine: str = "pytorch") -> LatencyTable:
    """Time the model against copies without a quarter of its attention (and of its MLP) sublayers, and without
    every sublayer (the floor), each pair of runs alternating, in ``engine`` (``llama.cpp`` times GGUF exports of
    the very same models)."""
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


def measure_width_latency_table(loaded: LoadedModel, setting: LatencySetting | None = None,
                                engine: str = "pytorch") -> WidthLatencyTable:
    """Time the model against copies with one KV group fewer in every attention block and with every FFN at half
    width, each pair of runs alternating."""
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


def measure_level_latency_table(loaded: LoadedModel, levels: dict[str, list[int]], setting: LatencySetting | None = None,
                                engine: str = "pytorch") -> LevelLatencyTable:
    """Time the model against a copy per (kind, kept) with every block's attention keeping ``kept`` KV groups or
    every MLP ``kept`` channels, in alternating runs (``levels``: kind -> the kept counts to time; the dense width
    is skipped)."""
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
def typed_probe(model: nn.Module, types: dict[str, str]) -> None:
    """Replace each named linear by an empty GGUF linear of its type (llama.cpp's fallback applied): a model for
    timing only, whose values are zeros."""

    for name, kind in types.items():
        model.set_submodule(name, GGUFLinear.empty(model.get_submodule(name), kind))


def typed_copy(loaded: LoadedModel, change: Callable[[nn.Module], None], types: Callable[[str], str]) -> LoadedModel:
    """A probe: a deep copy of ``loaded`` with ``change`` applied (removals, slices), then every decoder linear
    left stored as ``types(name)``."""
    def typed(model: nn.Module) -> None:
        change(model)
        typed_probe(model, {name: types(name) for name in decoder_linears(model)})

    return changed_copy(loaded, typed)


def _set_level(model: nn.Module, kind: str, kept: int) -> list[str]:
    """Remove or narrow every present ``kind`` sublayer of ``model``; the names of the sublayers changed."""
    adapter = get_adapter(model)
    changed = []
    for block in range(adapter.num_blocks):
        sublayer = adapter.attention(block) if kind == "attention" else adapter.mlp(block)
        if sublayer.removed:
            continue
        changed.append(sublayer.name)
        if kept == 0:
            continue
        if kind == "attention" and adapter.head_geometry(block).num_kv_heads > kept:
            slice_attention(adapter, block, list(range(kept)))
        elif kind == "mlp" and adapter.ffn_width(block) > kept:
            slice_mlp(adapter, block, list(range(kept)))
    if kept == 0:
        remove_sublayers(model, changed)
    return changed


def measure_typed_level_latency_table(loaded: LoadedModel, levels: dict[str, Iterable[tuple[int, str]]],
                                      reference_type: str, embedding_type: Optional[str] = None,
                                      setting: LatencySetting | None = None,
                                      engine: str = "llama.cpp") -> TypedLevelLatencyTable:
    """Time the dense model at ``reference_type`` against one probe per (kind, kept, type) of ``levels`` (kept 0:
    removed) with every sublayer of that kind at that level, in alternating runs."""
    setting = setting or LatencySetting()
    dense = typed_copy(loaded, lambda model: None, lambda name: reference_type)
    dense_ms: list[float] = []

    def timed(change: Callable[[nn.Module], None], types: Callable[[str], str]) -> float:
        """Decode ms per token the probe saves against the dense model at the reference type."""
        pair = typed_paired_latency(dense, typed_copy(loaded, change, types), setting, engine, embedding_type)
        dense_ms.append(pair.reference.decode_ms_per_token)
        return pair.saved_ms["decode"]

    adapter = get_adapter(loaded.model)
    widest = {"attention": max(adapter.head_geometry(b).num_kv_heads for b in range(adapter.num_blocks)),
              "mlp": max(adapter.ffn_width(b) for b in range(adapter.num_blocks))}
    saved: dict[str, dict[str, float]] = {}
    for kind, pairs in levels.items():
        saved[kind] = {}
        for kept, gguf_type in pairs:
            if kept >= widest[kind] and gguf_type == reference_type:  # the dense level itself
                saved[kind][TypedLevelLatencyTable.key(kept, gguf_type)] = 0.0
                continue
            changed: list[str] = []

            def change(model: nn.Module, kind: str = kind, kept: int = kept, changed: list[str] = changed) -> None:
                changed[:] = _set_level(model, kind, kept)

            def types(name: str, gguf_type: str = gguf_type, changed: list[str] = changed) -> str:
                return gguf_type if any(name.startswith(unit + ".") for unit in changed) else reference_type

            ms = timed(change, types)
            saved[kind][TypedLevelLatencyTable.key(kept, gguf_type)] = round(ms / max(1, len(changed)), 6)
    if not dense_ms:  # every level was the dense one
        dense_ms.append(typed_paired_latency(dense, dense, setting, engine, embedding_type).reference.decode_ms_per_token)
    return TypedLevelLatencyTable(setting=setting, reference_type=reference_type, embedding_type=embedding_type,
                                  dense_ms=round(statistics.median(dense_ms), 6), saved_ms=saved,
                                  engine=latency_engine(engine))
