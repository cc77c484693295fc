"""Bit packing of integer codes into bytes: every 8 codes of ``bits`` bits fill exactly ``bits`` bytes
(two 4-bit codes a byte, eight 3-bit codes in three bytes), so quantized weights are stored at their real
size and unpack with a few vectorised shifts per layer."""

from __future__ import annotations

import torch


def packed_bytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits (codes are packed in runs of eight)."""
    return (count + 7) // 8 * bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a flat uint8 tensor, little-endian."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    flat = codes.reshape(-1).to(torch.int64)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).reshape(-1, 8)
    if bits == 8:  # a byte per code (eight 8-bit codes would overflow the 63-bit shift below)
        return flat.to(torch.uint8).reshape(-1)
    value = (flat << (torch.arange(8, device=flat.device) * bits)).sum(1)  # 8 codes in 8·bits ≤ 56 bits
    return ((value[:, None] >> (torch.arange(bits, device=flat.device) * 8)) & 0xFF).to(torch.uint8).reshape(-1)


def unpack(packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The first ``count`` codes stored in ``packed`` by ``pack``, as ``dtype``."""
    if bits == 8:
        return packed[:count].to(dtype)
    if bits in (1, 2, 4):  # whole codes per byte: byte-wide shifts, no 64-bit words
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed[:, None] >> shifts) & ((1 << bits) - 1)
        return codes.reshape(-1)[:count].to(dtype).to(dtype)
    chunks = packed.to(torch.int64).reshape(-1, bits)
    value = (chunks << (torch.arange(bits, device=packed.device) * 8)).sum(1)
    codes = (value[:, None] >> (torch.arange(8, device=packed.device) * bits)) & ((1 << bits) - 1)
    return codes.reshape(-1)[:count].to(dtype)
