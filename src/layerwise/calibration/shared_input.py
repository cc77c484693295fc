"""Reuse one computation for consecutive hooks that see the same input tensor (q/k/v, gate/up)."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def per_input_memo(compute: Callable[[torch.Tensor], T]) -> Callable[[torch.Tensor], T]:
    """Wrap ``compute`` so calls with the same tensor object as the previous call return its result.

    The memo holds the last tensor, so its memory cannot be reused by another tensor meanwhile:
    identity really means "the same input".
    """
    last: dict[str, object] = {"input": None, "value": None}

    def memoised(x: torch.Tensor) -> T:
        if last["input"] is not x:
            last["input"], last["value"] = x, compute(x)
        return last["value"]  # type: ignore[return-value]

    return memoised
