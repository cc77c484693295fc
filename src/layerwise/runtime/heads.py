"""Which part of the controller's state each reward term's Q-head reads.

The state is telemetry, prompt features, the objective features and one predicted-latency ratio per profile
(``StateLayout``). A head that reads less has less to fit: on 200 training prompts, a quality head reading
every prompt feature fitted those prompts and ranked the profiles worse on new ones than one reading the length
alone, and a penalty head reading the telemetry learned the loads it saw rather than the latency it predicts.
Those wider layouts and a single whole-state head were measured and removed; this is the published one.
"""

from __future__ import annotations

from dataclasses import dataclass

from .controller import Head
from .features import PROMPT_FEATURES
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


def reward_heads(state: StateLayout, mode: str) -> dict[str, Head]:
    """One head per term of ``mode``'s reward (``RewardSettings.terms``, same order).

    Quality reads the prompt's length only. The latency term (``slo``: the objective's penalty; ``linear``: the seed's tokens/s) reads each
    profile's predicted latency over the objective, with the length and the slowdowns (how far the idle lines'
    shape may be off under load), and nothing of the telemetry: the slowdowns already carry what the load does
    to latency."""
    quality = Head((state.length,))
    latency = Head((state.length, *state.slowdowns), per_action=state.predicted)
    return {"speed": latency, "quality": quality} if mode == "linear" else {"quality": quality, "objective": latency}
