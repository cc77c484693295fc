"""Seeded calibration windows and non-overlapping evaluation windows over a token stream."""

from __future__ import annotations

import torch

from ..errors import DataError


def sample_calibration(token_ids: torch.Tensor, nsamples: int = 128, seqlen: int = 512, seed: int = 0,
                       bos: int | None = None) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets: shape [nsamples, seqlen]; with
    ``bos``, each window's first token is that BOS (the model then sees windows as it sees every prompt)."""
    if nsamples < 1 or seqlen < 2:
        raise DataError(f"Calibration needs nsamples >= 1 and seqlen >= 2 (got {nsamples} x {seqlen}).")
    if token_ids.numel() < seqlen:
        raise DataError(f"The calibration text has {token_ids.numel()} tokens, fewer than one window of {seqlen}.")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, token_ids.numel() - seqlen + 1, (nsamples,), generator=generator)
    return with_bos(torch.stack([token_ids[s : s + seqlen] for s in starts.tolist()]), bos)


def with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` [n, seqlen] with every first token replaced by ``bos`` (unchanged when None)."""
    if bos is None:
        return windows
    windows = windows.clone()
    windows[:, 0] = bos
    return windows


def evaluation_windows(token_ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
                       bos: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens, last partial window dropped: shape [n, seqlen]; with
    ``bos``, each window's first token is replaced by it (the replaced token is neither context nor scored)."""
    if seqlen < 2:
        raise DataError(f"Evaluation windows need seqlen >= 2 (got {seqlen}).")
    count = token_ids.numel() // seqlen
    if max_windows is not None:
        if max_windows < 1:
            raise DataError(f"--max-windows must be at least 1 (got {max_windows}).")
        count = min(count, max_windows)
    if count == 0:
        raise DataError(f"The evaluation text has {token_ids.numel()} tokens, fewer than one window of {seqlen}.")
    return with_bos(token_ids[: count * seqlen].view(count, seqlen), bos)
