"""Stream calibration batches through the decoder one block at a time, holding one block's inputs only."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.discovery import find_blocks


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


class BlockwiseRunner:
    """Holds the current block's inputs for every calibration batch and runs blocks on them.

    Typical use: for each block, register hooks, ``forward(i)``, change weights, then
    ``advance(forward(i))`` so the next block sees the (possibly compressed) outputs.
    ``storage`` may be ``"cpu"`` to keep activations off the accelerator for large models.
    """

    def __init__(self, model: nn.Module, calibration: torch.Tensor, batch_size: int = 8,
                 storage: str | torch.device | None = None) -> None:
        self.model = model
        self.prefix, self.blocks = find_blocks(model)
        self.device = next(model.parameters()).device
        self.storage = torch.device(storage) if storage is not None else self.device
        self.inputs, self.kwargs = self._capture(calibration, batch_size)

    @torch.no_grad()
    def _capture(self, calibration: torch.Tensor, batch_size: int) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
        inputs: list[torch.Tensor] = []
        kwargs_list: list[dict[str, Any]] = []

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            inputs.append(hidden.detach().to(self.storage))
            kwargs_list.append(kwargs)
            raise _StopForward

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for batch in calibration.split(batch_size):
                try:
                    self.model(input_ids=batch.to(self.device), use_cache=False)
                except _StopForward:
                    pass
        finally:
            handle.remove()
        return inputs, kwargs_list

    def block_name(self, index: int) -> str:
        return f"{self.prefix}.{index}"

    @torch.no_grad()
    def forward(self, index: int) -> list[torch.Tensor]:
        """Outputs of block ``index`` on the current inputs (hooks on its modules fire)."""
        block = self.blocks[index]
        outputs = []
        for hidden, kwargs in zip(self.inputs, self.kwargs):
            out = block(hidden.to(self.device), **kwargs)
            out = out[0] if isinstance(out, tuple) else out
            outputs.append(out.detach().to(self.storage))
        return outputs

    @torch.no_grad()
    def feed(self, index: int, needed: list[nn.Module]) -> None:
        """Run block ``index`` on the current inputs only as far as every module in ``needed`` has been reached
        (their forward pre-hooks fire, registered before this call), then stop: hooks that collect statistics
        of those modules' inputs need nothing after the last one, so its own work and the rest are skipped."""
        reached: set[int] = set()

        def arrive(module: nn.Module, _args: tuple) -> None:
            reached.add(id(module))
            if len(reached) == len(needed):
                raise _StopForward

        handles = [module.register_forward_pre_hook(arrive) for module in needed]
        try:
            for hidden, kwargs in zip(self.inputs, self.kwargs):
                reached.clear()
                try:
                    self.blocks[index](hidden.to(self.device), **kwargs)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """Make ``outputs`` the inputs of the next block."""
        self.inputs = outputs

    def progress(self, description: str):
        return tqdm(range(len(self.blocks)), desc=description, unit="block", disable=None, leave=False)


def block_linears(runner: BlockwiseRunner, index: int) -> dict[str, nn.Linear]:
    """Linears of block ``index`` by full unit name (``model.layers.3.mlp.down_proj``)."""
    prefix = runner.block_name(index)
    return {f"{prefix}.{name}": m for name, m in runner.blocks[index].named_modules() if isinstance(m, nn.Linear)}
