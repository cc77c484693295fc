"""``shortgpt``: ShortGPT's block influence, BI = 1 - cos(block input, block output) averaged over tokens,
measured once on the dense model; blocks with the lowest influence are removed first."""

from __future__ import annotations

import torch

from ..calibration.blockwise import BlockwiseRunner
from ..config import Budget
from .depth import DEPTH_ALLOCATORS, DepthAllocation, DepthContext, RemovalSearch, remove_blocks_in_order


@torch.no_grad()
def block_influence(context: DepthContext) -> dict[int, float]:
    """Mean over calibration tokens of 1 - cosine(input, output) for every block, streamed block by block."""
    runner = BlockwiseRunner(context.model, context.tokens(), context.batch_size)
    influence = {}
    for index in runner.progress("block influence"):
        outputs = runner.forward(index)
        values = [1 - torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1).flatten()
                  for x, y in zip(runner.inputs, outputs)]
        influence[index] = float(torch.cat(values).mean())
        runner.advance(outputs)
    return influence


@DEPTH_ALLOCATORS.register("shortgpt")
def shortgpt(context: DepthContext, budget: Budget) -> DepthAllocation:
    search = RemovalSearch(context, budget)
    try:
        influence = block_influence(context)
        order = sorted(influence, key=influence.get)
        remove_blocks_in_order(search, order, influence)
        return search.allocation({}, {"block_influence": influence})
    finally:
        search.close()
