"""What one sublayer costs in an engine whose speed depends on how weights are stored (llama.cpp: each GGUF type
has its own kernels), per level = (kept width, GGUF type) or removal. Measured as SPRINT measures removals:
every sublayer of one kind set to one level, every other linear at the reference type, the whole exported
model timed in alternating runs with the dense one; a sublayer's saving is the difference over their count. Probes hold empty GGUF linears of the
right types and shapes (speed does not depend on the values), so no quantization work is timed or done."""

from __future__ import annotations

import statistics
from typing import Callable, Iterable, Optional

from pydantic import BaseModel
from torch import nn

from ..config import LatencySetting
from ..errors import BudgetError, EngineError
from ..models import LoadedModel, decoder_linears, get_adapter
from .latency import PairedLatency
from .latency_table import changed_copy, latency_engine, paired_latency

# the engines whose speed depends on how weights are stored: their speed budgets keep GGUF types in the space
TYPE_DEPENDENT_ENGINES = ("llama.cpp",)


class TypedLevelLatencyTable(BaseModel):
    """Decode time per token of the dense model with every linear at ``reference_type``, and what one sublayer
    saves at each level (negative: that type decodes slower than the reference)."""

    setting: LatencySetting
    reference_type: str
    embedding_type: Optional[str]
    dense_ms: float
    saved_ms: dict[str, dict[str, float]]  # kind -> level key ("removed" or "kept@type") -> ms per sublayer
    engine: str = "llama.cpp"

    @staticmethod
    def key(kept: int, gguf_type: str) -> str:
        return "removed" if kept == 0 else f"{kept}@{gguf_type}"

    def saved(self, kind: str, kept: int, gguf_type: str) -> float:
        key = self.key(kept, gguf_type)
        try:
            return self.saved_ms[kind][key]
        except KeyError:
            raise BudgetError(f"The {self.engine} latency table has no {kind} level {key}; measure it with the "
                              "space's levels.") from None


def typed_probe(model: nn.Module, types: dict[str, str]) -> None:
    """Replace each named linear by an empty GGUF linear of its type (llama.cpp's fallback applied): a model for
    timing only, whose values are zeros."""
    from ..ops.gguf_quant import GGUFLinear

    for name, kind in types.items():
        model.set_submodule(name, GGUFLinear.empty(model.get_submodule(name), kind))


def typed_copy(loaded: LoadedModel, change: Callable[[nn.Module], None], types: Callable[[str], str]) -> LoadedModel:
    """A probe: a deep copy of ``loaded`` with ``change`` applied (removals, slices), then every decoder linear
    left stored as ``types(name)``."""
    def typed(model: nn.Module) -> None:
        change(model)
        typed_probe(model, {name: types(name) for name in decoder_linears(model)})

    return changed_copy(loaded, typed)


def typed_paired_latency(reference: LoadedModel, model: LoadedModel, setting: LatencySetting, engine: str,
                         embedding_type: Optional[str]) -> PairedLatency:
    """Two typed probes' decode timed in alternating runs, as the typed table and the speed guard time them."""
    if not setting.decode_steps:
        raise EngineError("A decode latency needs generated tokens: set the latency setting's generation on.")
    return paired_latency(reference, model, setting, engine, "f16", embedding_type)


def _set_level(model: nn.Module, kind: str, kept: int) -> list[str]:
    """Remove or narrow every present ``kind`` sublayer of ``model``; the names of the sublayers changed."""
    from ..ops.depth import remove_sublayers
    from ..ops.structured import slice_attention, slice_mlp

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
