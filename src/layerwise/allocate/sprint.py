"""``sprint``: SPRINT's sublayer search. Each step scores every remaining attention/MLP sublayer by the
distance its removal causes at the output of the next MLP (the sublayer that would be tuned), divides by
the latency it saves (latency-aware), rescores the best few after in-compression tuning of that MLP's
output projection (tunability-aware), and removes the best. The reference code's tuning (every output row
refitted over all inputs, undamped, 5 candidates) is ``direction="out_channel", in_comp_tuning_ratio=1.0,
damping_coefficient=0``; the defaults here (10% of the input columns, ridge damping relative to XᵀX, 4
candidates) are ours because they measured far better with a CPU-sized calibration set (8 x 256 tokens:
a full refit of 1536 inputs from 2048 tokens overfits; benchmarks/RESULTS.md, depth section). Scores are only recomputed where the last
removal can have changed them, sweeping once from the nearest activation checkpoint.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from tqdm.auto import tqdm

from ..calibration.distance import DISTANCES, mean_distance
from ..calibration.sublayers import States, SublayerStream
from ..component_options import declares, option
from ..config import Budget
from ..errors import BudgetError
from ..ops.tuning import DIRECTIONS, measurement_end, swapped_slice, tune_for_removal
from .depth import DEPTH_ALLOCATORS, CheckpointOptions, DepthAllocation, DepthContext, RemovalSearch


def sensitivity(stream: SublayerStream, states: States, position: int, metric: str, normalize: bool,
                fit: dict | None = None) -> float:
    """Distance at the end of the measured window between the model with and without sublayer ``position``;
    with ``fit``, the model without it uses the tuned columns (the reference keeps the original weights)."""
    _, end = measurement_end(stream, position)
    reference = stream.run(states, position, end)
    tuned = swapped_slice(fit["module"], fit["dim"], fit["index"], fit["values"]) if fit else contextlib.nullcontext()
    with tuned:
        pruned = stream.run(states, position, end, skip={position})
    return mean_distance(metric, reference, pruned, normalize)


class SprintOptions(CheckpointOptions):
    """SPRINT: the distance, latency awareness, in-compression tuning and checkpoints."""

    sprint_metric: Optional[str] = option("sprint: distance of the next MLP's input, l2-sentence (default), "
                                          "l2-token, cosine-token or cosine-sentence.", param="metric")
    normalize: Optional[bool] = option("sprint: divide L2 distances by the reference norm.",
                                       "--normalize/--no-normalize")
    latency_aware: Optional[bool] = option("sprint: divide sensitivity by the latency saved (default on).",
                                           "--latency-aware/--no-latency-aware")
    num_candidate_sublayers: Optional[int] = option("sprint: candidates rescored after tuning (default 4; the "
                                                    "reference's 5; 0 = no tuning).")
    in_comp_tuning_ratio: Optional[float] = option("sprint: share of the down projection's columns (in_channel) or "
                                                   "rows (out_channel) refitted (default 0.1; the reference's 1.0).")
    damping_coefficient: Optional[float] = option("sprint: damping of the refit towards the original weights "
                                                  "(default 0.01 relative; the reference's 0).")
    relative_damping: Optional[bool] = option("sprint: damping relative to mean diag(XᵀX) as a ridge (default), or "
                                              "absolute as the reference code stacks it.",
                                              "--relative-damping/--absolute-damping")
    direction: Optional[str] = option("sprint: refit down_proj's input columns, the others held fixed (in_channel, "
                                      "default) or its output rows over all inputs (out_channel, the reference's).")
    tuning_sublayer: Optional[str] = option("sprint: the sublayer tuned after a removal (mlp).")
    update_tuned_weights: Optional[bool] = option("sprint: keep the tuning of removed candidates (default on).",
                                                  "--update-tuned-weights/--no-update-tuned-weights")
    num_checkpoints: Optional[int] = option("sprint: activation checkpoints along the model (default 8).")


@declares(SprintOptions)
@DEPTH_ALLOCATORS.register("sprint")
def sprint(
    context: DepthContext,
    budget: Budget,
    metric: str = "l2-sentence",
    normalize: bool = False,
    latency_aware: bool = True,
    num_candidate_sublayers: int = 4,
    in_comp_tuning_ratio: float = 0.1,
    damping_coefficient: float = 0.01,
    direction: str = "in_channel",
    relative_damping: bool = True,
    tuning_sublayer: str = "mlp",
    update_tuned_weights: bool = True,
    num_checkpoints: int = 8,
    checkpointing_on_cpu: bool = False,
) -> DepthAllocation:
    """SPRINT: latency- and tunability-aware greedy removal until the budget holds."""
    DISTANCES.canonical(metric)
    if tuning_sublayer.lower() != "mlp":
        raise BudgetError(f"--tuning-sublayer must be mlp (got '{tuning_sublayer}'); SPRINT tunes MLP outputs.")
    if not 0.0 < in_comp_tuning_ratio <= 1.0:
        raise BudgetError(f"--in-comp-tuning-ratio must lie in (0, 1] (got {in_comp_tuning_ratio}).")
    if direction not in DIRECTIONS:
        raise BudgetError(f"--direction must be one of {', '.join(DIRECTIONS)} (got '{direction}').")
    if damping_coefficient < 0:
        raise BudgetError(f"--damping-coefficient must be >= 0 (got {damping_coefficient}).")
    params = {"metric": metric, "normalize": normalize, "latency_aware": latency_aware,
              "num_candidate_sublayers": num_candidate_sublayers, "in_comp_tuning_ratio": in_comp_tuning_ratio,
              "damping_coefficient": damping_coefficient, "direction": direction,
              "relative_damping": relative_damping, "tuning_sublayer": "mlp",
              "update_tuned_weights": update_tuned_weights, "num_checkpoints": num_checkpoints,
              "checkpointing_on_cpu": checkpointing_on_cpu}
    search = RemovalSearch(context, budget)
    try:
        stream = SublayerStream(context.model, context.tokens(), context.batch_size, num_checkpoints,
                                checkpointing_on_cpu)
        latency = context.latency.sublayer_ms
        sensitivities: dict[int, float] = {}
        tuning: dict[str, dict] = {}
        trace = []
        changed = 0  # sensitivities at positions whose window reaches past this point are stale
        while not search.done():
            _rescore(stream, sensitivities, changed, metric, normalize, len(trace) + 1)

            def importance(position: int, value: float) -> float:
                kind = stream.sublayer(position).kind
                return value / max(latency[kind], 1e-9) if latency_aware else value

            ranked = sorted(sensitivities, key=lambda p: importance(p, sensitivities[p]))
            chosen, chosen_score, fit = ranked[0], importance(ranked[0], sensitivities[ranked[0]]), None
            if num_candidate_sublayers > 0:
                best = None
                for position in ranked[:num_candidate_sublayers]:
                    states = stream.states_at(position)
                    candidate_fit = tune_for_removal(stream, states, position, in_comp_tuning_ratio,
                                                     damping_coefficient, direction, relative_damping)
                    if candidate_fit is None:
                        score = importance(position, sensitivities[position])
                    else:
                        tuned = sensitivity(stream, states, position, metric, normalize, candidate_fit)
                        score = importance(position, tuned)
                    if best is None or score < best[0]:
                        best = (score, position, candidate_fit)
                chosen_score, chosen, fit = best
            name = stream.sublayer(chosen).name
            trace.append({"removed": name, "sensitivity": sensitivities[chosen], "importance": chosen_score,
                          "tuned": fit["unit"] if fit else None,
                          "tuning_error": [fit["error_before"], fit["error_after"]] if fit else None})
            if fit is not None and update_tuned_weights:
                search.enter(swapped_slice(fit["module"], fit["dim"], fit["index"], fit["values"]))
                tuning[name] = {"unit": fit["unit"], "ratio": in_comp_tuning_ratio, "damping": damping_coefficient,
                                "direction": direction, "damping_relative": relative_damping}
            search.record([name], chosen_score)
            sensitivities.pop(chosen)
            stream.refresh(chosen)
            changed = chosen
        return search.allocation(params, {"sprint_trace": trace}, tuning)
    finally:
        search.close()


@torch.no_grad()
def _rescore(stream: SublayerStream, sensitivities: dict[int, float], changed: int, metric: str,
             normalize: bool, step: int) -> None:
    """Recompute every score whose measured window reaches past ``changed``, in one sweep from a checkpoint.

    The sweep carries the unpruned states forward one sublayer at a time; they are the reference at each
    window's end, and skipping sublayer ``p`` is just running on from the states before it, so each
    candidate costs only the sublayers of its own window."""
    present = [p for p in range(stream.num_positions) if not stream.sublayer(p).removed]
    stale = {p for p in present if p not in sensitivities or measurement_end(stream, p)[1] > changed}
    if not stale:
        return
    ends = {p: measurement_end(stream, p)[1] for p in stale}
    start, last = min(stale), max(ends.values())
    states = stream.states_at(start)
    pending: dict[int, list[tuple[int, States]]] = {}
    for position in tqdm(range(start, last + 1), desc=f"sprint step {step}: sensitivities", disable=None,
                         leave=False):
        for candidate, pruned in pending.pop(position, []):
            sensitivities[candidate] = mean_distance(metric, states, pruned, normalize)
        if position in stale:
            pending.setdefault(ends[position], []).append((position, stream.run(states, position + 1, ends[position])))
        if position < last:
            states = stream.run(states, position, position + 1)
