"""Optional recovery after structural pruning: a short LoRA fine-tune (peft) of the decoder linears on the
calibration windows, merged back into the weights, so the saved model keeps its pruned shapes."""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel
from torch import nn
from tqdm.auto import tqdm

from .config import HealSetting
from .heal.lora import lora_adapters

LORA_RANK = 8
LORA_ALPHA = 16


class RecoveryReport(BaseModel):
    steps: int
    learning_rate: float
    rank: int
    batch_size: int
    seqlen: int
    losses: list[float]
    seconds: float


def recover_with_lora(model: nn.Module, tokens: torch.Tensor, steps: int, learning_rate: float = 1e-4,
                      batch_size: int = 4, seed: int = 0) -> RecoveryReport:
    """Fine-tune rank-8 LoRA adapters for ``steps`` steps on windows drawn (seeded) from ``tokens`` [n, seqlen],
    then merge them into the base weights in place."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    losses = []
    start = time.perf_counter()
    with lora_adapters(model, HealSetting(method="lora", lora_rank=LORA_RANK, lora_alpha=LORA_ALPHA)) as wrapped:
        optimizer = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=learning_rate)
        wrapped.train()
        for _ in tqdm(range(steps), desc="LoRA recovery", unit="step", disable=None, leave=False):
            rows = torch.randint(0, tokens.shape[0], (min(batch_size, tokens.shape[0]),), generator=generator)
            batch = tokens[rows].to(device)
            loss = wrapped(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 5))
    return RecoveryReport(steps=steps, learning_rate=learning_rate, rank=LORA_RANK, batch_size=batch_size,
                          seqlen=tokens.shape[1], losses=losses, seconds=round(time.perf_counter() - start, 3))
