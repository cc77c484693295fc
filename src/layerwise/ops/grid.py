"""The quantization grid every method shares: groups along the input, per-group scale and zero point, codes,
round-to-nearest and its float round trip (RTN, GPTQ's searches, AWQ's scale and clipping searches)."""

from __future__ import annotations

import torch


def group_bounds(in_features: int, group_size: int | None) -> list[tuple[int, int]]:
    """Column ranges of the quantization groups; per-channel (None) is one group of the whole row."""
    size = group_size or in_features
    return [(start, min(start + size, in_features)) for start in range(0, in_features, size)]


def quant_params(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (scale, zero) of the block ``w`` [rows, columns]; the range always includes 0.

    Asymmetric: GPTQ's convention, (max - min) / (2^b - 1) with an integer zero point. Symmetric: the
    largest magnitude maps exactly to ±(2^(b-1) - 1) around the zero 2^(b-1) (absmax / 7 at 4 bits), so a
    group's extreme weight is kept exactly. GPTQ's own absmax / 7.5 puts that weight on a rounding tie
    (±7.5 steps) which float16 scales break either way; on smollm2-135m W4 g64 that choice alone moved
    wiki perplexity from 74.5 (ties rounded out to -8) to 68.9 (in to -7, compressed-tensors' float32
    arithmetic) and 64.9 (absmax / 7, see benchmarks/RESULTS.md)."""
    maxq = 2**bits - 1
    low = torch.clamp(w.min(dim=1).values, max=0.0)
    high = torch.clamp(w.max(dim=1).values, min=0.0)
    if symmetric:
        absmax = torch.maximum(low.abs(), high)
        scale = torch.where(absmax == 0, torch.ones_like(absmax), absmax) / (maxq // 2)
        return scale.to(torch.float16).float(), torch.full_like(scale, (maxq + 1) / 2)
    flat = (low == 0) & (high == 0)
    low, high = torch.where(flat, -torch.ones_like(low), low), torch.where(flat, torch.ones_like(high), high)
    scale = (high - low) / maxq
    zero = torch.round(-low / scale)
    return scale.to(torch.float16).float(), zero  # the scale as stored, so codes are chosen against it


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, 2**bits - 1)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return scale[:, None] * (codes - zero[:, None])


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """The float weight of ``codes`` [out, in] with per-group ``scales`` and ``zeros`` [out, groups]: full groups
    by one broadcast, the shorter last group (if any) on its own."""
    out_features, in_features = codes.shape
    size = group_size or in_features
    full = in_features // size * size
    weight = torch.empty_like(codes, dtype=torch.float32)
    if full:
        groups = full // size
        block = codes[:, :full].float().reshape(out_features, groups, size)
        weight[:, :full] = ((block - zeros[:, :groups, None]) * scales[:, :groups, None]).reshape(-1, full)
    if full < in_features:
        weight[:, full:] = (codes[:, full:].float() - zeros[:, -1:]) * scales[:, -1:]
    return weight


def rtn_round_trip(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool) -> torch.Tensor:
    """``weight`` rounded to nearest as it would be stored, back in float32 (for searches and error estimates)."""
    return dequantize(*rtn_quantize(weight, bits, group_size, symmetric), group_size)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None, symmetric: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes, scales and zeros of ``weight`` [out, in] per group."""
    w = weight.float()
    codes, scales, zeros = torch.empty_like(w), [], []
    for start, end in group_bounds(w.shape[1], group_size):
        scale, zero = quant_params(w[:, start:end], bits, symmetric)
        codes[:, start:end] = quantize_codes(w[:, start:end], scale, zero, bits)
        scales.append(scale)
        zeros.append(zero)
    return codes, torch.stack(scales, 1), torch.stack(zeros, 1)
