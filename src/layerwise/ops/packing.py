"""Bit packing of integer codes into bytes, as bit planes: a ``bits``-wide code is split into planes of
4, 2 and 1 bits (3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1, 8 = one byte) and each plane packs whole
codes into bytes. Every 8 codes still fill exactly ``bits`` bytes (eight 3-bit codes in three bytes), so
quantized weights are stored at their real size, and unpacking is a few byte-wide shifts per plane, the
same fast path for every width (no 64-bit words)."""

from __future__ import annotations

import torch


def packed_bytes(count: int, bits: int) -> int:
    """Bytes holding ``count`` codes of ``bits`` bits (codes are packed in runs of eight)."""
    return (count + 7) // 8 * bits


def planes(bits: int) -> list[int]:
    """Plane widths of a ``bits``-bit code, widest first, low bits first: 3 → [2, 1], 7 → [4, 2, 1]."""
    if not 1 <= bits <= 8:
        raise ValueError(f"cannot pack {bits}-bit codes")
    if bits == 8:
        return [8]
    return [width for width in (4, 2, 1) if bits & width]


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack non-negative integer ``codes`` (< 2**bits) into a flat uint8 tensor: plane after plane, each
    plane little-endian within a byte."""
    flat = codes.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)])
    out, shift = [], 0
    for width in planes(bits):
        plane = (flat >> shift) & ((1 << width) - 1)
        per_byte = 8 // width
        shifts = torch.arange(per_byte, device=flat.device, dtype=torch.uint8) * width
        out.append((plane.reshape(-1, per_byte) << shifts).sum(1, dtype=torch.uint8))
        shift += width
    return torch.cat(out)


def unpack(packed: torch.Tensor, bits: int, count: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """The first ``count`` codes stored in ``packed`` by ``pack``, as ``dtype``."""
    padded = (count + 7) // 8 * 8
    codes, offset, shift = None, 0, 0
    for width in planes(bits):
        size = padded * width // 8
        per_byte = 8 // width
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * width
        plane = ((packed[offset : offset + size, None] >> shifts) & ((1 << width) - 1)).reshape(-1)
        codes = plane if codes is None else codes | (plane << shift)
        offset, shift = offset + size, shift + width
    return codes[:count].to(dtype)
