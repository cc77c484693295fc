"""``sleb``: SLEB's greedy block elimination: at each step, remove the block whose removal leaves the
lowest calibration perplexity of the model pruned so far. Each candidate reruns only the blocks after
it, from a checkpoint at its own input."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..calibration.sublayers import SublayerStream
from ..component_options import declares
from ..config import Budget
from .depth import DEPTH_ALLOCATORS, CheckpointOptions, DepthAllocation, DepthContext, RemovalSearch


def _perplexity_without(stream: SublayerStream, tokens: list[torch.Tensor], block: int) -> float:
    return stream.perplexity_from(2 * block, tokens, skip={2 * block, 2 * block + 1})


@declares(CheckpointOptions)
@DEPTH_ALLOCATORS.register("sleb")
def sleb(context: DepthContext, budget: Budget, checkpointing_on_cpu: bool = False) -> DepthAllocation:
    search = RemovalSearch(context, budget)
    try:
        tokens = context.tokens()
        stream = SublayerStream(context.model, tokens, context.batch_size,
                                num_checkpoints=search.adapter.num_blocks, checkpoint_on_cpu=checkpointing_on_cpu)
        batches = list(tokens.split(context.batch_size))
        trace = []
        while not search.done():
            candidates = [b for b in range(search.adapter.num_blocks) if search.adapter.sublayers(b)]
            scores = {b: _perplexity_without(stream, batches, b)
                      for b in tqdm(candidates, desc=f"sleb step {len(trace) + 1}", disable=None, leave=False)}
            best = min(scores, key=scores.get)
            trace.append({"block": best, "calibration_ppl": scores[best]})
            search.record([s.name for s in search.adapter.sublayers(best)], scores[best])
            stream.refresh(2 * best)
        return search.allocation({"checkpointing_on_cpu": checkpointing_on_cpu}, {"sleb_trace": trace})
    finally:
        search.close()
