"""``drop-last``: remove the last blocks first, the simplest depth baseline."""

from __future__ import annotations

from ..config import Budget
from .depth import DEPTH_ALLOCATORS, DepthAllocation, DepthContext, RemovalSearch, remove_blocks_in_order


@DEPTH_ALLOCATORS.register("drop-last", "drop_last")
def drop_last(context: DepthContext, budget: Budget) -> DepthAllocation:
    search = RemovalSearch(context, budget)
    try:
        remove_blocks_in_order(search, list(reversed(range(search.adapter.num_blocks))))
        return search.allocation({})
    finally:
        search.close()
