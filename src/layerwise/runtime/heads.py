"""Which part of the controller's state each reward term's Q-head reads: named layouts (``--heads``).

The state is telemetry, prompt features, the objective features and one predicted-latency ratio per profile
(``StateLayout``). A head that reads less has less to fit: on 200 training prompts, a quality head reading
every prompt feature fits those prompts and ranks the profiles worse on new ones than one reading the length
alone, and a penalty head reading the telemetry learns the loads it saw rather than the latency it predicts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Registry
from .controller import Head
from .features import PROMPT_FEATURES, TAGGED_FEATURES
from .objectives import OBJECTIVE_FEATURES
from .telemetry import TELEMETRY_FEATURES


@dataclass(frozen=True)
class StateLayout:
    """Where each group of features sits in a state of ``profiles`` profiles."""

    profiles: int

    @property
    def telemetry(self) -> tuple[int, ...]:
        return tuple(range(len(TELEMETRY_FEATURES)))

    @property
    def prompt(self) -> tuple[int, ...]:
        start = len(TELEMETRY_FEATURES)
        return tuple(range(start, start + len(PROMPT_FEATURES)))

    @property
    def tags(self) -> tuple[int, ...]:
        """The prompt features spaCy's parse gives (``TAGGED_FEATURES``)."""
        return tuple(self.prompt[PROMPT_FEATURES.index(name)] for name in TAGGED_FEATURES)

    @property
    def length(self) -> int:
        return self.prompt[PROMPT_FEATURES.index("length")]

    @property
    def objective(self) -> tuple[int, ...]:
        start = self.prompt[-1] + 1
        return tuple(range(start, start + len(OBJECTIVE_FEATURES)))

    @property
    def slowdowns(self) -> tuple[int, ...]:
        """The running prefill and decoding slowdowns."""
        return tuple(self.objective[OBJECTIVE_FEATURES.index(name)]
                     for name in ("prefill_slowdown", "decode_slowdown"))

    @property
    def predicted(self) -> tuple[int, ...]:
        """One log(predicted latency / objective) per profile."""
        start = self.objective[-1] + 1
        return tuple(range(start, start + self.profiles))

    @property
    def size(self) -> int:
        return self.objective[-1] + 1 + self.profiles


HeadLayout = Callable[[StateLayout, str], dict[str, Head]]
HEAD_LAYOUTS: Registry[HeadLayout] = Registry("head layout")


@HEAD_LAYOUTS.register("prompt")
def prompt_heads(state: StateLayout, mode: str) -> dict[str, Head]:
    """Quality reads every prompt feature. Speed (linear) reads the telemetry and the length, factored (see
    ``Head``); the objective's penalty (slo) reads the telemetry, the length, the objective and the slowdowns,
    and per profile its predicted latency over the objective (``PerActionQNetwork``)."""
    quality = Head(state.prompt)
    if mode == "linear":
        return _linear_heads(state, quality)
    return {"quality": quality,
            "objective": Head((*state.telemetry, state.length, *state.objective), per_action=state.predicted)}


@HEAD_LAYOUTS.register("lean")
def lean_heads(state: StateLayout, mode: str) -> dict[str, Head]:
    """Quality reads the prompt's length only. The objective's penalty reads each profile's predicted latency
    over the objective, with the length and the slowdowns (how far the idle lines' shape may be off under load),
    and nothing of the telemetry: the slowdowns already carry what the load does to latency. Speed (linear) as
    in ``prompt``."""
    quality = Head((state.length,))
    if mode == "linear":
        return _linear_heads(state, quality)
    return {"quality": quality, "objective": Head((state.length, *state.slowdowns), per_action=state.predicted)}


def _linear_heads(state: StateLayout, quality: Head) -> dict[str, Head]:
    """The seed's reward: speed from the telemetry and the length, factored (see ``Head``), beside ``quality``."""
    return {"speed": Head((*state.telemetry, state.length), factored=True), "quality": quality}


@HEAD_LAYOUTS.register("one")
def one_head(state: StateLayout, mode: str) -> dict[str, Head]:
    """One head learns the whole reward from the whole state."""
    return {"reward": Head()}
