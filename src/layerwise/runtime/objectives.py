"""Per-request latency objectives: how they are drawn, and what the controller knows about meeting them.

A server operator's target is "answer within N ms at the best quality possible". Whether a profile meets it
depends on the prompt's length (prefill grows with it), on the machine's load (contention slows every profile)
and on the profile itself. ``SpeedEstimates`` turns that into a few cheap numbers for the controller's state:
each profile's idle latency as a function of the prompt's length (two timed points per profile, fitted once at
start-up), its prefill and its decoding each times a running *slowdown* (observed / predicted time of the
requests just served, an exponential average), so every profile's current latency is estimated from whichever
profile ran last. Prefill and decoding need not slow alike (one pass over many tokens against a chain of small
steps), and one factor for both would mispredict long passages from short questions or the reverse. A slow
running *factor* per profile corrects what start-up timing got wrong about that profile against the others
(each start-up's lines put some profiles 5-15% off, by the same amount under every load).
"""

from __future__ import annotations

import math
import statistics
import random
from dataclasses import dataclass, field

import torch

from ..errors import LayerwiseError
from .generate import generate

OBJECTIVE_FEATURES = ("objective", "prefill_slowdown", "decode_slowdown")  # then one "predicted latency /
# objective" per profile
NOMINAL_OBJECTIVE_MS = 1000.0  # what the state assumes when a request states no objective
RATIO_CLIP = 2.0  # log-ratios beyond e^±2 say "far too slow" / "far faster" and no more
# a profile's factor moves by at most smoothing × this (log) per request: start-up errors are within ±0.2, while
# a load change misread for a few requests is larger and is the slowdowns' to follow, not the profile's
FACTOR_STEP_CLIP = 0.2


class ObjectiveError(LayerwiseError):
    """An objective range that cannot be parsed or drawn from."""


@dataclass(frozen=True)
class ObjectiveRange:
    """Latency objectives drawn log-uniformly from [low_ms, high_ms] (one value: every request gets it). A
    ``relative`` range holds factors instead: a request's objective is the factor times the dense model's idle
    latency for that request (``RuntimeEnvironment.idle_latency_ms``). Milliseconds are what a server's clients
    state; factors make the same experiment bind alike on a faster or a slower machine."""

    low_ms: float
    high_ms: float
    relative: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.low_ms <= self.high_ms:
            raise ObjectiveError(f"A latency objective range needs 0 < low ≤ high (got {self}).")

    @classmethod
    def parse(cls, text: str) -> "ObjectiveRange":
        """``LOW:HIGH`` or ``MS``, in milliseconds; ``0.5x:4x`` (or ``2x``): factors of the dense idle latency."""
        low, _, high = text.strip().partition(":")
        relative = low.endswith("x") or high.endswith("x")
        try:
            low_value = float(low.removesuffix("x"))
            return cls(low_value, float(high.removesuffix("x") or low_value), relative)
        except ValueError:
            raise ObjectiveError("--slo-ms takes LOW:HIGH or one value in milliseconds, or factors of the dense "
                                 f"model's idle latency such as 0.5x:4x (got '{text}').") from None

    def draw(self, rng: random.Random) -> float:
        """Milliseconds, or for a relative range the factor."""
        return math.exp(rng.uniform(math.log(self.low_ms), math.log(self.high_ms)))

    def __str__(self) -> str:
        unit = "x" if self.relative else ""
        return f"{self.low_ms:g}{unit}:{self.high_ms:g}{unit}"


@dataclass(frozen=True)
class LatencyLine:
    """Idle latency of one profile: prefill ``a + b·L`` ms and ``c + d·L`` ms per further decoded token, for a
    prompt of ``L`` tokens."""

    prefill_ms: float
    prefill_ms_per_token: float
    step_ms: float
    step_ms_per_token: float

    def prefill(self, prompt_tokens: int) -> float:
        return self.prefill_ms + self.prefill_ms_per_token * prompt_tokens

    def decoding(self, prompt_tokens: int, new_tokens: int) -> float:
        """The ``new_tokens − 1`` steps after the prefill (which gives the first token)."""
        return max(0, new_tokens - 1) * (self.step_ms + self.step_ms_per_token * prompt_tokens)

    def predict(self, prompt_tokens: int, new_tokens: int) -> float:
        return self.prefill(prompt_tokens) + self.decoding(prompt_tokens, new_tokens)

    @classmethod
    def through(cls, short: tuple[int, float, float], long: tuple[int, float, float]) -> "LatencyLine":
        """The line through two timings (prompt tokens, prefill ms, ms per decoded token); slopes never negative."""
        span = max(1, long[0] - short[0])
        prefill_slope = max(0.0, (long[1] - short[1]) / span) if long[0] > short[0] else 0.0
        step_slope = max(0.0, (long[2] - short[2]) / span) if long[0] > short[0] else 0.0
        return cls(short[1] - prefill_slope * short[0], prefill_slope, short[2] - step_slope * short[0], step_slope)


@dataclass
class SpeedEstimates:
    """Each profile's predicted latency now: its idle prefill and decoding lines, each times the running slowdown
    the machine showed for that phase, times the profile's own running factor (geometric mean 1 over the
    profiles, so the slowdowns keep meaning "the machine against its idle self")."""

    lines: dict[str, LatencyLine]
    prefill_slowdown: float = 1.0
    decode_slowdown: float = 1.0
    smoothing: float = 0.5  # weight of the newest request in the running slowdowns
    # weight of a request's residual in its profile's factor: slow, since the factor stands for a fixed error of
    # start-up timing and the per-request noise is 7-11% (median); replaying two recorded test runs' errors
    # through such factors, 0.1 cut the spread of the profiles' median errors from 0.11-0.22 to 0.02-0.06 (log)
    factor_smoothing: float = 0.1
    factors: dict[str, float] = field(default_factory=dict)

    def factor(self, profile: str) -> float:
        return self.factors.get(profile, 1.0)

    def predict(self, profile: str, prompt_tokens: int, new_tokens: int) -> float:
        line = self.lines[profile]
        return self.factor(profile) * (self.prefill_slowdown * line.prefill(prompt_tokens)
                                       + self.decode_slowdown * line.decoding(prompt_tokens, new_tokens))

    def fastest(self, prompt_tokens: int, new_tokens: int) -> tuple[str, float]:
        """The profile predicted fastest for this request, and its predicted latency in ms."""
        return min(((name, self.predict(name, prompt_tokens, new_tokens)) for name in self.lines),
                   key=lambda item: item[1])

    def observe(self, profile: str, prompt_tokens: int, new_tokens: int, prefill_ms: float, decode_ms: float) -> None:
        """Fold one served request's measured prefill and decoding times into the slowdowns (decoding only when
        more than one token was decoded: the prefill gives the first), then what the slowdowns do not explain
        into the profile's factor."""
        line, factor = self.lines[profile], self.factor(profile)
        self.prefill_slowdown = self._fold(self.prefill_slowdown, prefill_ms, factor * line.prefill(prompt_tokens))
        decoded = new_tokens > 1
        if decoded:
            self.decode_slowdown = self._fold(self.decode_slowdown, decode_ms,
                                              factor * line.decoding(prompt_tokens, new_tokens))
        observed, predicted = prefill_ms + (decode_ms if decoded else 0.0), self.predict(profile, prompt_tokens,
                                                                                          new_tokens)
        if self.factor_smoothing > 0 and observed > 0 and predicted > 0:
            residual = min(FACTOR_STEP_CLIP, max(-FACTOR_STEP_CLIP, math.log(observed / predicted)))
            self._shift_factor(profile, self.factor_smoothing * residual)

    def _shift_factor(self, profile: str, step: float) -> None:
        """Move ``profile``'s log factor by ``step`` and renormalise the factors to geometric mean 1, the common
        part going into the slowdowns: every other profile's prediction stays as it was."""
        logs = {name: math.log(self.factor(name)) for name in self.lines}
        logs[profile] += step
        common = sum(logs.values()) / len(logs)
        self.factors = {name: math.exp(value - common) for name, value in logs.items()}
        self.prefill_slowdown *= math.exp(common)
        self.decode_slowdown *= math.exp(common)

    def _fold(self, current: float, observed: float, expected: float) -> float:
        if expected > 0 and observed > 0:
            return current + self.smoothing * (observed / expected - current)
        return current

    def features(self, prompt_tokens: int, new_tokens: int, objective_ms: float | None) -> list[float]:
        """``OBJECTIVE_FEATURES`` (logs) then log(predicted / objective) per profile, clipped to ±``RATIO_CLIP``."""
        objective = objective_ms or NOMINAL_OBJECTIVE_MS
        ratios = [math.log(max(self.predict(name, prompt_tokens, new_tokens), 1e-3) / objective)
                  for name in self.lines]
        return [math.log(objective / NOMINAL_OBJECTIVE_MS), math.log(max(self.prefill_slowdown, 1e-3)),
                math.log(max(self.decode_slowdown, 1e-3)), *(min(RATIO_CLIP, max(-RATIO_CLIP, r)) for r in ratios)]


@dataclass
class SpeedCalibration:
    """How the idle lines are measured: prompts of ``short`` and ``long`` tokens, ``new_tokens`` decoded, the
    median of ``repeats`` runs per point (after one warm-up), in ``repeats`` rounds that each time every
    profile once, so that a drift of the machine during start-up spreads over every profile alike."""

    short: int = 16
    long: int = 512
    new_tokens: int = 8
    # timed one profile after the other, 2 runs each, one start-up's lines put some profiles 10-24% off their
    # served latency (by the same amount under every load) and the next start-up others: as large as the gaps
    # between profiles that an objective must tell apart. On smollm2-135m, 4 interleaved rounds cut the spread
    # of a profile's latency relative to the dense one between calibrations from 3-13% to 2-5% (sd), for
    # ~40 s of start-up instead of ~22
    repeats: int = 4

    def prompt(self, length: int, vocab_size: int) -> torch.Tensor:
        """A fixed prompt of ``length`` tokens (content does not change the time a dense forward takes)."""
        return (torch.arange(length) * 7919 % max(2, vocab_size - 1) + 1).unsqueeze(0)


def calibrate_speeds(profiles, model: torch.nn.Module, vocab_size: int, context: int | None,
                     calibration: SpeedCalibration | None = None) -> SpeedEstimates:
    """Time every profile of ``profiles`` (a ``ProfileSet``) at a short and a long prompt, the profiles
    interleaved round by round; the dense model is back afterwards."""

    settings = calibration or SpeedCalibration()
    long = min(settings.long, (context or settings.long) // 2)
    lengths = (settings.short, long)
    prompts = {length: settings.prompt(length, vocab_size) for length in lengths}
    for name in profiles.names:
        with profiles.using(name):
            for length in lengths:
                generate(model, prompts[length], 2, profiles.kv_eviction())  # warm-up
    timed = {name: [([], []) for _ in lengths] for name in profiles.names}  # per point: prefill runs, step runs
    for _ in range(settings.repeats):
        for name in profiles.names:
            with profiles.using(name):
                for (prefill, step), length in zip(timed[name], lengths):
                    run = generate(model, prompts[length], settings.new_tokens, profiles.kv_eviction())
                    prefill.append(1000 * run.prefill_s)
                    step.append(1000 * run.decode_s / max(1, len(run.new_tokens) - 1))
    # the median of the repeats, as every latency the package reports (a preempted run moves it little)
    return SpeedEstimates({name: LatencyLine.through(*((length, statistics.median(prefill), statistics.median(step))
                                                       for length, (prefill, step) in zip(lengths, points)))
                           for name, points in timed.items()})
