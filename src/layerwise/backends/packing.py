"""Bit packing of integer codes into bytes (any width 1-8: two 4-bit codes a byte, eight 3-bit codes in
three bytes), so quantized weights are stored at their real size."""

from __future__ import annotations

import torch


def packed_bytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a flat uint8 tensor, little-endian bit order."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    flat = codes.reshape(-1).to(torch.int64)
    shifts = torch.arange(bits, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = 1 << torch.arange(8, device=flat.device)
    return (stream.reshape(-1, 8) * weights).sum(1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes stored in ``packed`` by ``pack`` (int64)."""
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: count * bits].reshape(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)
