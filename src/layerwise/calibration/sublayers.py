"""Calibration hidden states at sublayer boundaries, with activation checkpoints.

Position ``p`` (0 .. 2·blocks) is the residual stream just before sublayer ``p`` (even: attention of block
p//2, odd: its MLP); position 2·blocks is the last block's output. Only the states at a few checkpoint
positions are stored (on CPU if asked), so evaluating what happens after sublayer ``p`` reruns the model
from the nearest checkpoint at or before ``p``, never from the start.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from ..evaluate.perplexity import next_token_nll
from ..models.adapter import Sublayer, get_adapter
from .blockwise import BlockwiseRunner

States = list[torch.Tensor]  # one tensor per calibration batch


def checkpoint_positions(num_positions: int, num_checkpoints: int) -> list[int]:
    """``num_checkpoints`` positions spread evenly over [0, num_positions), always including 0."""
    count = max(1, min(num_checkpoints, num_positions))
    return sorted({round(i * num_positions / count) for i in range(count)})


class SublayerStream:
    """Runs calibration batches sublayer by sublayer from stored checkpoints; the model is never copied."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, num_checkpoints: int = 4,
                 checkpoint_on_cpu: bool = False) -> None:
        self.model = model
        self.adapter = get_adapter(model)
        self.device = next(model.parameters()).device
        storage = torch.device("cpu") if checkpoint_on_cpu else self.device
        runner = BlockwiseRunner(model, tokens, batch_size, storage=storage)
        self.storage = storage
        self.kwargs = runner.kwargs
        self.num_positions = 2 * self.adapter.num_blocks
        self.positions = checkpoint_positions(self.num_positions, num_checkpoints)
        if self.adapter.parallel_residual:  # checkpoint at block inputs, which a parallel MLP reads too
            self.positions = sorted({p - p % 2 for p in self.positions})
        self.checkpoints: dict[int, States] = {0: runner.inputs}
        self.refresh(0)

    def sublayer(self, position: int) -> Sublayer:
        block, odd = divmod(position, 2)
        return self.adapter.mlp(block) if odd else self.adapter.attention(block)

    def position_of(self, name: str) -> int:
        sublayer = self.adapter.sublayer(name)
        return 2 * sublayer.block + (sublayer.kind == "mlp")

    @torch.no_grad()
    def run(self, states: States, start: int, stop: int, skip: Iterable[int] = ()) -> States:
        """States at ``stop`` from states at ``start``, with the sublayers at positions ``skip`` left out. With a
        parallel residual each MLP also reads its block's input (recomputed when ``start`` is an MLP)."""
        skipped = set(skip)
        parallel = self.adapter.parallel_residual
        inputs = self.states_at(start - 1) if parallel and start % 2 else [None] * len(states)
        out = []
        for hidden, block_input, kwargs in zip(states, inputs, self.kwargs):
            hidden = hidden.to(self.device)
            block_input = block_input.to(self.device) if block_input is not None else None
            for position in range(start, stop):
                if position % 2 == 0:
                    block_input = hidden
                if position not in skipped:
                    hidden = self.adapter.sublayer_forward(self.sublayer(position), hidden, kwargs, block_input)
            out.append(hidden)
        return out

    @torch.no_grad()
    def logits_from(self, position: int, skip: Iterable[int] = ()) -> list[torch.Tensor]:
        """Logits of the model as it is now on every batch, running only the sublayers from ``position`` on
        (the states before it are the stored ones), the positions in ``skip`` left out."""
        final = self.run(self.states_at(position), position, self.num_positions, skip=skip)
        return [self.adapter.logits(hidden) for hidden in final]

    def perplexity_from(self, position: int, batches: list[torch.Tensor], skip: Iterable[int] = ()) -> float:
        """Perplexity on ``batches`` (the stream's token batches) of ``logits_from(position, skip)``."""

        nll, count = 0.0, 0
        for logits, ids in zip(self.logits_from(position, skip), batches):
            batch_nll, predicted = next_token_nll(logits, ids)
            nll += batch_nll
            count += predicted
        return math.exp(nll / count)

    def nearest_checkpoint(self, position: int) -> int:
        return max(p for p in self.checkpoints if p <= position)

    def states_at(self, position: int) -> States:
        """States of the model as it is now just before sublayer ``position`` (from the nearest checkpoint)."""
        start = self.nearest_checkpoint(position)
        return self.run(self.checkpoints[start], start, position)

    @torch.no_grad()
    def refresh(self, changed: int) -> None:
        """Recompute the checkpoints after position ``changed`` (a sublayer there was removed or retuned)."""
        start = self.nearest_checkpoint(changed)
        states = self.checkpoints[start]
        for position in [p for p in self.positions if p > start]:
            states = self.run(states, start, position)
            self.checkpoints[position] = [s.to(self.storage) for s in states]
            start = position

    def next_present(self, position: int, kind: str) -> int | None:
        """The first position after ``position`` holding a present sublayer of ``kind`` (None if none)."""
        for candidate in range(position + 1, self.num_positions):
            sublayer = self.sublayer(candidate)
            if sublayer.kind == kind and not sublayer.removed:
                return candidate
        return None
