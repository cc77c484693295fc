"""Measured latency of attention and MLP sublayers in one deployment setting, and the speedup a set of
removals is predicted to give. As SPRINT does, a kind's latency is measured by removing a quarter of
its sublayers and timing the whole model, so per-call overheads that hooks would hide are counted."""

from __future__ import annotations

from pydantic import BaseModel
from torch import nn

from ..config import LatencySetting
from ..models.adapter import get_adapter
from .latency import measure_latency

KINDS = ("attention", "mlp")


class LatencyTable(BaseModel):
    """Whole-model latency and the latency one sublayer of each kind adds, in the same setting."""

    setting: LatencySetting
    total_ms: float
    sublayer_ms: dict[str, float]
    probe_removed: dict[str, int]

    def saved_ms(self, kinds: list[str]) -> float:
        return sum(self.sublayer_ms[kind] for kind in kinds)

    def predicted_speedup(self, removed_kinds: list[str]) -> float:
        """Dense latency over predicted latency once sublayers of ``removed_kinds`` are gone."""
        remaining = max(self.total_ms - self.saved_ms(removed_kinds), 1e-9)
        return self.total_ms / remaining


def measure_latency_table(model: nn.Module, setting: LatencySetting | None = None) -> LatencyTable:
    """Time the model whole, then without a quarter of its attention (and of its MLP) sublayers."""
    from ..backends.depth import temporarily_removed

    setting = setting or LatencySetting()
    adapter = get_adapter(model)
    full = measure_latency(model, setting).total_ms
    per_kind, probes = {}, {}
    for kind in KINDS:
        names = [s.name for s in adapter.all_sublayers() if s.kind == kind]
        count = max(1, len(names) // 4)
        # the last sublayers but one, like SPRINT's probe; any equal-shape sublayers would do
        probe = names[-count - 1 : -1] if len(names) > count else names[:count]
        with temporarily_removed(model, probe):
            reduced = measure_latency(model, setting).total_ms
        per_kind[kind] = round(max(full - reduced, 0.0) / len(probe), 4)
        probes[kind] = len(probe)
    return LatencyTable(setting=setting, total_ms=full, sublayer_ms=per_kind, probe_removed=probes)
