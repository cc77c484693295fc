"""A cheap, weight-sensitive model fingerprint used as a cache key (dense PPL, profiles)."""

from __future__ import annotations

import hashlib

import torch
from torch import nn

SAMPLES_PER_TENSOR = 1 << 16


def model_fingerprint(model: nn.Module) -> str:
    """Hash of every tensor's name, shape, dtype and a strided sample of its values.

    Sampling keeps this fast for 7B models while still changing whenever weights are pruned,
    sliced or quantized (those change shapes, or many values spread over the tensor).
    """
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // SAMPLES_PER_TENSOR)
        sample = flat[::stride].to("cpu", torch.float64).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|{int((flat == 0).sum())}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:20]
