"""AWQ's activation-aware scale search, composable with any quantizer (``awq: true`` on quantize actions).

For each group of linears fed the same input (q/k/v after the attention norm, gate/up after the MLP norm,
down after up), try per-input-channel scales s = mean|x|^α (α on a grid, normalised by √(max·min)), quantize
W·diag(s) as the plan says, and keep the α whose outputs on calibration tokens, x·diag(1/s)·Q(W·diag(s))ᵀ,
are closest to the float outputs. The chosen s is folded into the preceding norm (or up_proj rows) and
the group's weight columns, an exact equivalence before quantization. α = 0 (no scaling) is on the grid,
so the search never does worse than plain rounding on its tokens. The v→o pair is skipped when grouped
KV heads make v_proj's output narrower than o_proj's input, as AWQ does.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..models.adapter import get_adapter
from ..plan import Action
from .base import ApplyContext
from .quantize import rtn_round_trip

GRID = 20
MAX_TOKENS = 4096  # calibration tokens per search: AWQ's scales are stable well below that


def fake_quantize(weight: torch.Tensor, action: Action) -> torch.Tensor:
    """``weight`` rounded as the action would store it, back in float (for the search only)."""
    return rtn_round_trip(weight, action.bits, action.group_size, action.symmetric)


@torch.no_grad()
def search_scales(x: torch.Tensor, linears: list[nn.Linear], actions: list[Action], grid: int = GRID
                  ) -> tuple[torch.Tensor, float, float]:
    """(best scales, its output error, the unscaled error) for ``linears`` sharing input ``x`` [tokens, in]."""
    x = x.to(linears[0].weight.device).float()
    x_mean = x.abs().mean(0)
    reference = [x @ linear.weight.float().t() for linear in linears]
    best, best_error, plain_error = None, float("inf"), None
    for step in range(grid):
        alpha = step / grid
        scales = x_mean.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = 0.0
        for linear, action, ref in zip(linears, actions, reference):
            quantized = fake_quantize(linear.weight.float() * scales, action) / scales
            error += float((x @ quantized.t() - ref).pow(2).mean())
        if step == 0:
            plain_error = error
        if error < best_error:
            best, best_error = scales, error
    return best, best_error, plain_error


def _fold(previous: nn.Module, linears: list[nn.Linear], scales: torch.Tensor) -> None:
    """previous(x)/s feeds W·diag(s): the product is unchanged. ``previous`` is a norm or a linear's rows."""
    with torch.no_grad():
        previous.weight.div_(scales.view(-1, *([1] * (previous.weight.dim() - 1))).to(previous.weight.dtype))
        if getattr(previous, "bias", None) is not None:  # a LayerNorm's shift or a linear's bias scales too
            previous.bias.div_(scales.to(previous.bias.dtype))
        for linear in linears:
            linear.weight.mul_(scales.to(linear.weight.dtype)[None, :])


@torch.no_grad()
def apply_awq(model: nn.Module, actions: list[Action], context: ApplyContext) -> dict[str, dict[str, float]]:
    """Search and fold AWQ scales for every group with an ``awq`` action, block by block; returns, per group,
    the search's output error with and without the chosen scales."""
    from ..profile import BlockwiseRunner

    by_unit = {a.unit: a for a in actions if a.awq}
    adapter = get_adapter(model)
    if not ({"q", "k", "v"} <= set(adapter.attention_roles) and {"gate", "up"} <= set(adapter.mlp_roles)
            and adapter.attention_norm and adapter.mlp_norm and not adapter.attention_post_norm):
        raise UnsupportedArchitectureError(
            f"AWQ folds its scales into pre-norms and separate q/k/v and gate/up projections; "
            f"{type(adapter).__name__} models have another layout. Quantize them without --awq.")
    source = context.require_calibration()
    runner = BlockwiseRunner(model, source.tokens(), source.settings.calib_batch_size)
    report = {}
    names = {id(m): n for n, m in model.named_modules()}  # folding changes values, never modules
    for index in runner.progress("awq"):
        attention, mlp = adapter.attention(index), adapter.mlp(index)
        block = adapter.blocks[index]
        groups = []
        if not attention.removed:
            groups.append((block.get_submodule(adapter.attention_norm), [attention.linears[r] for r in ("q", "k", "v")]))
            if attention.linears["v"].out_features == attention.linears["o"].in_features:
                groups.append((attention.linears["v"], [attention.linears["o"]]))
        if not mlp.removed:
            groups.append((block.get_submodule(adapter.mlp_norm), [mlp.linears["gate"], mlp.linears["up"]]))
            groups.append((mlp.linears["up"], [mlp.linears["down"]]))
        wanted = [(previous, linears) for previous, linears in groups if any(names[id(m)] in by_unit for m in linears)]
        if wanted:
            inputs = _capture_inputs(runner, index, [linears[0] for _, linears in wanted])
            for (previous, linears), x in zip(wanted, inputs):
                chosen = [(m, by_unit[names[id(m)]]) for m in linears if names[id(m)] in by_unit]
                scales, error, plain = search_scales(x, [m for m, _ in chosen], [a for _, a in chosen])
                _fold(previous, linears, scales.to(linears[0].weight.device))
                report[names[id(linears[0])]] = {"error": error, "unscaled_error": plain}
        if index + 1 < len(runner.blocks):
            runner.advance(runner.forward(index))
    return report


def _capture_inputs(runner, index: int, linears: list[nn.Linear]) -> list[torch.Tensor]:
    """The first ``MAX_TOKENS`` calibration inputs of each linear in block ``index`` (one forward)."""
    captured: list[list[torch.Tensor]] = [[] for _ in linears]

    def hook(slot: int):
        def record(_module, args, _output):
            if sum(t.shape[0] for t in captured[slot]) < MAX_TOKENS:
                captured[slot].append(args[0].reshape(-1, args[0].shape[-1]).detach().float().cpu())
        return record

    handles = [linear.register_forward_hook(hook(slot)) for slot, linear in enumerate(linears)]
    try:
        runner.forward(index)
    finally:
        for handle in handles:
            handle.remove()
    return [torch.cat(parts)[:MAX_TOKENS] for parts in captured]
