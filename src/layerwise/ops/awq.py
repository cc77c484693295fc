"""AWQ as published (llm-awq's ``run_awq``), composable with any quantizer (``awq: true`` on quantize actions).

Block by block, on the float model's block inputs:

1. **Scale search.** For each group of linears fed the same input (q/k/v after the attention norm, gate/up
   after the MLP norm, o after v, down after up) try per-input-channel scales s = mean|x|^α (α on a grid of 20,
   normalised by √(max·min)), quantize W·diag(s) as the plan says, and keep the α that best preserves the
   output of the module the group feeds (AWQ's ``module2inspect``: the whole attention for q/k/v, the whole MLP
   for gate/up, the linear itself for o and down) on calibration tokens. The chosen s is folded into the
   preceding norm (or v/up rows) and the group's weight columns, an exact equivalence before quantization.
   The v→o pair is skipped when grouped KV heads make v_proj's output narrower than o_proj's input, as AWQ does.
2. **Clip search.** For every scaled linear but q and k (their outputs meet in a product that a per-linear
   error does not see), per output row and quantization group, shrink the clipping range max|w| by 0 to 45% in
   5% steps and keep the one whose quantized output on 512 sampled input tokens is closest to the float
   output; the weights are clamped to it (quantizing then rounds the clamped weights).

The next block sees the float block's outputs, as in the reference, so errors do not steer later searches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..calibration import BlockwiseRunner
from ..errors import UnsupportedArchitectureError
from ..models.adapter import get_adapter
from ..plan import Action
from .base import ApplyContext
from .grid import group_bounds, rtn_round_trip

GRID = 20
MAX_TOKENS = 4096  # calibration tokens per scale search: AWQ's scales are stable well below that
CLIP_GRID, CLIP_MAX_SHRINK, CLIP_TOKENS = 20, 0.5, 512  # llm-awq's auto_clip defaults

Call = tuple[tuple, dict[str, Any]]


def fake_quantize(weight: torch.Tensor, action: Action) -> torch.Tensor:
    """``weight`` rounded as the action would store it, back in float (for the searches only)."""
    return rtn_round_trip(weight, action.bits, action.group_size, action.symmetric)


@dataclass
class ScaleGroup:
    """Linears fed by one input, the module whose output ``previous`` (a norm or a linear) writes it, and the
    module whose output scores candidate scales."""

    previous: nn.Module
    linears: list[nn.Linear]
    inspect: nn.Module
    calls: list[Call] = field(default_factory=list)


def _outputs(module: nn.Module, calls: list[Call]) -> list[torch.Tensor]:
    outputs = []
    for args, kwargs in calls:
        out = module(*args, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out).float())
    return outputs


@torch.no_grad()
def search_scales(x: torch.Tensor, linears: list[nn.Linear], actions: list[Action], inspect: nn.Module | None = None,
                  calls: list[Call] | None = None, grid: int = GRID) -> tuple[torch.Tensor, float, float]:
    """(best scales, its error, the unscaled error) for ``linears`` (each with its action) sharing input ``x``
    [tokens, in]. The error is the mean squared change of ``inspect``'s output on ``calls`` while the linears
    hold their scaled, rounded and unscaled weights; by default, the first linear's own output on ``x``."""
    if inspect is None:
        inspect, calls = linears[0], [((x.to(linears[0].weight.device, linears[0].weight.dtype),), {})]
    x_mean = x.float().abs().mean(0).to(linears[0].weight.device)
    originals = [linear.weight.detach().clone() for linear in linears]
    reference = _outputs(inspect, calls)
    best, best_error, plain_error = None, float("inf"), float("inf")
    try:
        for step in range(grid):
            scales = x_mean.pow(step / grid).clamp(min=1e-4)
            scales = scales / (scales.max() * scales.min()).sqrt()
            for linear, action, weight in zip(linears, actions, originals):
                linear.weight.copy_((fake_quantize(weight.float() * scales, action) / scales).to(weight.dtype))
            error = sum(float((out - ref).pow(2).mean()) for out, ref in zip(_outputs(inspect, calls), reference))
            error /= len(reference)
            if step == 0:
                plain_error = error
            if error < best_error:
                best, best_error = scales, error
    finally:
        for linear, weight in zip(linears, originals):
            linear.weight.copy_(weight)
    return best, best_error, plain_error


@torch.no_grad()
def search_clip(x: torch.Tensor, weight: torch.Tensor, action: Action, grid: int = CLIP_GRID,
                max_shrink: float = CLIP_MAX_SHRINK, tokens: int = CLIP_TOKENS) -> tuple[list[torch.Tensor], float, float]:
    """Per quantization group, the clipping bound [out] of each row that best preserves that group's share of
    the output on ``tokens`` evenly spaced rows of ``x``; also the summed output error with and without."""
    x = x.float().to(weight.device)
    x = x[:: max(1, x.shape[0] // tokens)]
    bounds, clipped_error, plain_error = [], 0.0, 0.0
    for start, end in group_bounds(weight.shape[1], action.group_size):
        w, xg = weight[:, start:end].float(), x[:, start:end]
        reference = xg @ w.t()
        full = w.abs().amax(dim=1, keepdim=True)
        best, best_error = full.clone(), torch.full_like(full, float("inf"))
        for step in range(int(max_shrink * grid)):
            bound = full * (1 - step / grid)
            rounded = rtn_round_trip(torch.clamp(w, -bound, bound), action.bits, None, action.symmetric)
            error = (xg @ rounded.t() - reference).pow(2).mean(0)[:, None]
            if step == 0:
                plain_error += float(error.sum())
            better = error < best_error
            best, best_error = torch.where(better, bound, best), torch.where(better, error, best_error)
        bounds.append(best[:, 0])
        clipped_error += float(best_error.sum())
    return bounds, clipped_error, plain_error


def _clip(linear: nn.Linear, bounds: list[torch.Tensor], group_size: int | None) -> None:
    weight = linear.weight.data
    for (start, end), bound in zip(group_bounds(weight.shape[1], group_size), bounds):
        b = bound.to(weight.dtype)[:, None]
        weight[:, start:end] = torch.clamp(weight[:, start:end], -b, b)


def _fold(previous: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """previous(x)/s feeds W·diag(s): the product is unchanged. ``previous`` is a norm or a linear's rows."""
    with torch.no_grad():
        previous.weight.div_(scales.view(-1, *([1] * (previous.weight.dim() - 1))).to(previous.weight.dtype))
        if getattr(previous, "bias", None) is not None:  # a LayerNorm's shift or a linear's bias scales too
            previous.bias.div_(scales.to(previous.bias.dtype))
        for linear in linears:
            linear.weight.mul_(scales.to(linear.weight.dtype)[None, :])


def _groups(adapter, index: int) -> list[ScaleGroup]:
    attention, mlp = adapter.attention(index), adapter.mlp(index)
    block = adapter.blocks[index]
    groups = []
    if not attention.removed:
        linears = attention.linears
        groups.append(ScaleGroup(block.get_submodule(adapter.attention_norm), [linears[r] for r in ("q", "k", "v")],
                                 attention.module))
        if linears["v"].out_features == linears["o"].in_features:
            groups.append(ScaleGroup(linears["v"], [linears["o"]], linears["o"]))
    if not mlp.removed:
        linears = mlp.linears
        groups.append(ScaleGroup(block.get_submodule(adapter.mlp_norm), [linears["gate"], linears["up"]], mlp.module))
        groups.append(ScaleGroup(linears["up"], [linears["down"]], linears["down"]))
    return groups


def check_awq_layout(adapter) -> None:
    """AWQ folds its scales into the norm or linear before each group: the Llama layout, nothing else."""
    if not ({"q", "k", "v"} <= set(adapter.attention_roles) and {"gate", "up"} <= set(adapter.mlp_roles)
            and adapter.attention_norm and adapter.mlp_norm and not adapter.attention_post_norm):
        raise UnsupportedArchitectureError(
            f"AWQ folds its scales into pre-norms and separate q/k/v and gate/up projections; "
            f"{type(adapter).__name__} models have another layout. Quantize them without --awq.")


@torch.no_grad()
def apply_awq(model: nn.Module, actions: list[Action], context: ApplyContext, clip: bool = True
              ) -> dict[str, dict[str, dict[str, float]]]:
    """Search and fold AWQ scales, then (with ``clip``) search and apply clipping, block by block, for every
    linear with an ``awq`` action; returns the searches' output errors with and without their choice, per group
    (``scales``) and per clipped linear (``clip``)."""

    by_unit = {a.unit: a for a in actions if a.awq}
    adapter = get_adapter(model)
    check_awq_layout(adapter)
    source = context.require_calibration()
    runner = BlockwiseRunner(model, source.tokens(), source.settings.calib_batch_size)
    report: dict[str, dict[str, dict[str, float]]] = {"scales": {}, "clip": {}}
    names = {id(m): n for n, m in model.named_modules()}  # folding changes values, never modules
    for index in runner.progress("awq"):
        groups = [g for g in _groups(adapter, index) if any(names[id(m)] in by_unit for m in g.linears)]
        inputs, outputs = _capture(runner, index, groups)  # without groups: just the block's outputs
        scaled_inputs = []  # each group's input as its linears see it once the scales are folded in
        for group, x in zip(groups, inputs):
            chosen = [(m, by_unit[names[id(m)]]) for m in group.linears if names[id(m)] in by_unit]
            scales, error, plain = search_scales(x, [m for m, _ in chosen], [a for _, a in chosen],
                                                 group.inspect, group.calls)
            _fold(group.previous, group.linears, scales.to(group.linears[0].weight.device))
            report["scales"][names[id(group.linears[0])]] = {"error": error, "unscaled_error": plain}
            scaled_inputs.append(x / scales.to(x.device))
        no_clip = {id(adapter.attention(index).linears.get(role)) for role in ("q", "k")}
        for group, x in zip(groups, scaled_inputs) if clip else ():
            for linear in group.linears:
                name = names[id(linear)]
                if name in by_unit and id(linear) not in no_clip:
                    bounds, clipped, plain = search_clip(x, linear.weight, by_unit[name])
                    _clip(linear, bounds, by_unit[name].group_size)
                    report["clip"][name] = {"error": clipped, "unclipped_error": plain}
        if index + 1 < len(runner.blocks):
            runner.advance(outputs)
    return report


def _capture(runner, index: int, groups: list[ScaleGroup]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One float forward of block ``index``: the first ``MAX_TOKENS`` inputs of each group, each inspected
    module's calls on them (arguments as given), and the block's outputs (the next block's inputs)."""
    captured: list[list[torch.Tensor]] = [[] for _ in groups]

    def record_input(slot: int):
        def hook(_module, args, _output):
            if sum(t.shape[0] for t in captured[slot]) < MAX_TOKENS:
                captured[slot].append(args[0].reshape(-1, args[0].shape[-1]).detach().float().cpu())
        return hook

    def record_call(group: ScaleGroup):
        def hook(_module, args, kwargs):
            if sum(_tokens(*call) for call in group.calls) < MAX_TOKENS:
                group.calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        return hook

    handles = [g.linears[0].register_forward_hook(record_input(slot)) for slot, g in enumerate(groups)]
    handles += [g.inspect.register_forward_pre_hook(record_call(g), with_kwargs=True) for g in groups]
    try:
        outputs = runner.forward(index)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts)[:MAX_TOKENS] for parts in captured], outputs


def _tokens(args: tuple, kwargs: dict[str, Any]) -> int:
    hidden = args[0] if args else kwargs["hidden_states"]
    return hidden.numel() // hidden.shape[-1]
