"""What one sublayer costs in an engine whose speed depends on how weights are stored (llama.cpp: each GGUF type
has its own kernels), per level = (kept width, GGUF type) or removal. Measured as SPRINT measures removals:
every sublayer of one kind set to one level, every other linear at the reference type, the whole exported
model timed in alternating runs with the dense one; a sublayer's saving is the difference over their count. Probes hold empty GGUF linears of the
right types and shapes (speed does not depend on the values), so no quantization work is timed or done."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel

from ..config import LatencySetting
from ..errors import BudgetError, EngineError
from ..models import LoadedModel
from .latency import PairedLatency
from .latency_table import paired_latency

# the engines whose speed depends on how weights are stored (each engine's module adds itself): their speed
# budgets keep GGUF types in the space
TYPE_DEPENDENT_ENGINES: set[str] = set()


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


def typed_paired_latency(reference: LoadedModel, model: LoadedModel, setting: LatencySetting, engine: str,
                         embedding_type: Optional[str]) -> PairedLatency:
    """Two typed probes' decode timed in alternating runs, as the typed table and the speed guard time them."""
    if not setting.decode_steps:
        raise EngineError("A decode latency needs generated tokens: set the latency setting's generation on.")
    return paired_latency(reference, model, setting, engine, "f16", embedding_type)
