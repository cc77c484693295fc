"""Quantize and dequantize one weight matrix with the real GGUF quantizers, so the bytes we keep are the bytes
llama.cpp runs: gguf's numpy reference quantizers for the legacy types without an importance matrix, and
ggml's own ``ggml_quantize_chunk`` (the function ``llama-quantize`` calls per tensor) for k-quants and for
any type with an importance matrix. Dequantization is gguf's numpy reference."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from gguf import quants

from .native import ggml_base
from .types import GGUFType

ROWS_PER_TASK = 256


def quantize_matrix(weight: torch.Tensor | np.ndarray, kind: GGUFType, imatrix: np.ndarray | None = None,
                    threads: int | None = None) -> np.ndarray:
    """``weight`` [rows, row_length] stored as ``kind``: uint8 [rows, row bytes] (float types as their bytes).
    ``imatrix`` holds one importance per input column (llama.cpp's mean squared activation)."""
    data = np.ascontiguousarray(_as_numpy(weight), dtype=np.float32)
    rows, row_length = data.shape
    if not kind.fits(row_length):
        raise ValueError(f"{kind.name} needs rows divisible by {kind.block}, got {row_length}")
    if not kind.quantized:
        return data.astype(np.float16 if kind.name == "f16" else np.float32).view(np.uint8).reshape(rows, -1) \
            if kind.name != "bf16" else quants.quantize(data, kind.ggml)
    if kind.legacy and imatrix is None:
        return quants.quantize(data, kind.ggml)
    return _ggml_quantize(data, kind, imatrix, threads)


def _ggml_quantize(data: np.ndarray, kind: GGUFType, imatrix: np.ndarray | None, threads: int | None) -> np.ndarray:
    lib = ggml_base()
    rows, row_length = data.shape
    row_bytes = int(lib.ggml_row_size(int(kind.ggml), row_length))
    out = np.zeros((rows, row_bytes), dtype=np.uint8)
    weights = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    if weights is not None and weights.shape != (row_length,):
        raise ValueError(f"importance matrix has {weights.shape} entries for rows of {row_length}")
    src, dst = data.ctypes.data, out.ctypes.data
    imatrix_pointer = None if weights is None else weights.ctypes.data

    def run(first: int) -> int:
        count = min(ROWS_PER_TASK, rows - first)
        return lib.ggml_quantize_chunk(int(kind.ggml), ctypes.c_void_p(src), ctypes.c_void_p(dst),
                                       first * row_length, count, row_length, imatrix_pointer)

    starts = range(0, rows, ROWS_PER_TASK)
    with ThreadPoolExecutor(max_workers=threads or torch.get_num_threads()) as pool:  # ctypes drops the GIL
        written = sum(pool.map(run, starts))
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes for {kind.name}, expected {out.nbytes}")
    return out


def dequantize_matrix(raw: np.ndarray, kind: GGUFType, shape: tuple[int, int]) -> torch.Tensor:
    """The float32 weight [rows, row_length] that ``raw`` (as ``quantize_matrix`` returns) stands for."""
    rows, row_length = shape
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1)
    if kind.name == "f32":
        values = raw.view(np.float32)
    elif kind.name == "f16":
        values = raw.view(np.float16).astype(np.float32)
    else:
        values = quants.dequantize(raw, kind.ggml)
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(rows, row_length))


def round_trip(weight: torch.Tensor, kind: GGUFType, imatrix: np.ndarray | None = None) -> torch.Tensor:
    """``weight`` as llama.cpp will compute with it once stored as ``kind`` (float32, same shape)."""
    shape = tuple(weight.shape)
    return dequantize_matrix(quantize_matrix(weight, kind, imatrix), kind, shape).to(weight.dtype)


def _as_numpy(weight: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(weight, torch.Tensor):
        return weight.detach().to("cpu", torch.float32).numpy()
    return weight
