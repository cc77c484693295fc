"""Scoring candidates: the KL divergence of a candidate's next-token distribution from the dense model's on
fixed calibration tokens, in two stages (a few windows, then all: EvoPress's multi-step selection), serially
or on Ray workers that each hold their own level bank. Scores are memoised per (genome, stage), so a search is
charged only for candidates it has not seen."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ...errors import LayerwiseError
from ...models import load
from .bank import LevelBank
from .space import Genome, JointSpace


@dataclass
class ScoringSetup:
    """Everything a scorer needs to build its bank and score: shipped once to every worker."""

    space: JointSpace
    groups: dict[int, list[int]]
    channels: dict[int, list[int]]
    tokens: torch.Tensor  # [windows, seqlen]
    dense_logprobs: torch.Tensor  # [windows, seqlen - 1, vocab] of the dense model
    stage_windows: tuple[int, ...]  # windows scored at each stage (a prefix of ``tokens``)
    batch_size: int = 4
    threads: int | None = None


@torch.no_grad()
def dense_logprobs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The dense model's next-token log-probabilities on ``tokens`` (positions 0..n-2), float32 on the CPU."""
    device = next(model.parameters()).device
    parts = [torch.log_softmax(model(batch.to(device)).logits[:, :-1].float(), dim=-1).cpu()
             for batch in tokens.split(batch_size)]
    return torch.cat(parts)


@dataclass(frozen=True)
class ModelBySpec:
    """A model each worker loads itself (``layerwise.load``): on a cluster, nothing large crosses the network."""

    spec: str
    dtype: str = "float32"
    device: str = "cpu"


class Scorer:
    """One level bank and the scoring loop (what a Ray worker holds)."""

    def __init__(self, model: nn.Module | ModelBySpec, setup: ScoringSetup) -> None:
        if setup.threads:
            torch.set_num_threads(setup.threads)
        if isinstance(model, ModelBySpec):

            model = load(model.spec, model.dtype, model.device).model
        self.setup = setup
        self.bank = LevelBank(model, setup.space, setup.groups, setup.channels)
        self.device = next(self.bank.model.parameters()).device

    @torch.no_grad()
    def score(self, genome: Genome, stage: int) -> float:
        """Mean per-token KL(dense ‖ candidate) over the stage's windows."""
        model = self.bank.assemble(genome)
        windows = self.setup.stage_windows[stage]
        total, count = 0.0, 0
        for start in range(0, windows, self.setup.batch_size):
            stop = min(windows, start + self.setup.batch_size)
            logits = model(self.setup.tokens[start:stop].to(self.device)).logits[:, :-1].float()
            candidate = torch.log_softmax(logits, dim=-1).cpu()
            reference = self.setup.dense_logprobs[start:stop]
            total += float((reference.exp() * (reference - candidate)).sum())
            count += reference.shape[0] * reference.shape[1]
        return total / count

    def score_many(self, genomes: list[Genome], stage: int) -> list[float]:
        return [self.score(genome, stage) for genome in genomes]


@dataclass
class CountingEvaluator:
    """Memoises scores and counts evaluations (forward passes over a stage's windows) and tokens scored."""

    setup: ScoringSetup
    evaluations: int = 0
    tokens: int = 0
    memo: dict[tuple[Genome, int], float] = field(default_factory=dict)
    per_candidate: list[float] = field(default_factory=list)  # seconds per candidate of each full-stage batch

    def score(self, genomes: list[Genome], stage: int) -> list[float]:
        todo = list(dict.fromkeys(g for g in genomes if (g, stage) not in self.memo))
        if todo:
            start = time.perf_counter()
            for genome, value in zip(todo, self._score(todo, stage)):
                self.memo[(genome, stage)] = value
            elapsed = time.perf_counter() - start
            if stage == len(self.setup.stage_windows) - 1:
                self.per_candidate.append(elapsed / len(todo))
            self.evaluations += len(todo)
            self.tokens += len(todo) * self.setup.stage_windows[stage] * (self.setup.tokens.shape[1] - 1)
        return [self.memo[(g, stage)] for g in genomes]

    def _score(self, genomes: list[Genome], stage: int) -> list[float]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class SerialEvaluator(CountingEvaluator):
    """Scores in this process, on one level bank."""

    def __init__(self, model: nn.Module, setup: ScoringSetup) -> None:
        super().__init__(setup)
        self.scorer = Scorer(model, setup)

    def _score(self, genomes: list[Genome], stage: int) -> list[float]:
        return self.scorer.score_many(genomes, stage)


class RayEvaluator(CountingEvaluator):
    """Scores on ``workers`` Ray actors (a local cluster, or the one at ``address``), each with its own level
    bank; a batch is dealt out in turn and the results come back in order, so the search sees the
    same scores as a serial one. A local cluster gets the model through Ray's object store; workers of a
    cluster at ``address`` load it themselves (``ModelBySpec``), one GPU each when it runs on CUDA."""

    def __init__(self, model: nn.Module | ModelBySpec, setup: ScoringSetup, workers: int,
                 address: str | None = None) -> None:
        super().__init__(setup)
        try:
            import ray
        except ImportError as error:  # pragma: no cover - ray is a dependency
            raise LayerwiseError("--workers needs Ray (pip install ray).") from error
        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            options: dict[str, Any] = {"address": address} if address else {"num_cpus": workers}
            ray.init(include_dashboard=False, log_to_driver=False, logging_level="ERROR", **options)
        gpus = 1 if isinstance(model, ModelBySpec) and model.device.startswith("cuda") else 0
        actor = ray.remote(num_cpus=1, num_gpus=gpus)(Scorer)
        model_ref, setup_ref = ray.put(model), ray.put(setup)
        self.actors = [actor.remote(model_ref, setup_ref) for _ in range(workers)]

    def _score(self, genomes: list[Genome], stage: int) -> list[float]:
        shares = [genomes[i::len(self.actors)] for i in range(len(self.actors))]
        results = self.ray.get([a.score_many.remote(share, stage) for a, share in zip(self.actors, shares) if share])
        ordered: list[float] = [0.0] * len(genomes)
        for worker, values in enumerate(results):
            for position, value in zip(range(worker, len(genomes), len(self.actors)), values):
                ordered[position] = value
        return ordered

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        if self.started:
            self.ray.shutdown()
