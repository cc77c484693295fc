"""ModelAdapter: the only code that knows a family's module names; one registered class per layout.

A family is described by data: where its attention and MLP sublayers and their norms sit (pre-norms, and the
post-norms Gemma 2/3 and OLMo 2 apply to a sublayer's output), its linears by role (separate q/k/v/o or a fused
``qkv``; gate/up/down, a fused ``gate_up``, or an ungated up/down), norms that belong to heads (OLMo 2's
q/k norms over the whole projection), and whether attention and MLP read the same block input (GPT-NeoX's
parallel residual). From that description the adapter derives head geometry, width-unit layouts
(``models.width``), removal and a sublayer's share of the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..registry import Registry
from .discovery import find_blocks, is_linear_like
from .swaps import SwapLog, set_head_counts
from .width import Slot, UnitLayout, keep_units

ADAPTERS: Registry[type["ModelAdapter"]] = Registry("model family")


@dataclass(frozen=True)
class HeadGeometry:
    """Attention geometry of one block, read from its current shapes (so it follows slicing)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads sharing one KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class Sublayer:
    """One attention or MLP sublayer of a block, with its linears by role (none once removed)."""

    kind: str
    block: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Linear]
    removed: bool = False


class RemovedSublayer(nn.Module):
    """Stands in for a deleted attention or MLP: adds nothing to the residual stream, costs nothing."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if hidden_states is None:
            hidden_states = next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        zero = hidden_states.new_zeros(())  # broadcasts in the residual add; no full-size tensor
        return (zero, None) if self.kind == "attention" else zero

    def extra_repr(self) -> str:
        return f"removed {self.kind}"


class SkippedNorm(nn.Module):
    """A norm of a removed sublayer: its input is unused or zero, so it does no work."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def is_removed(module: nn.Module) -> bool:
    return isinstance(module, RemovedSublayer)


class ModelAdapter:
    """Structure of a decoder family: blocks, sublayers, linears by role, head geometry and width layouts.

    Subclasses name their modules in the class attributes below and register with ``ADAPTERS``.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    attention_module: ClassVar[str] = "self_attn"
    mlp_module: ClassVar[str] = "mlp"
    attention_norm: ClassVar[Optional[str]] = "input_layernorm"  # pre-norm feeding attention (None: none)
    attention_post_norm: ClassVar[Optional[str]] = None  # norm applied to attention's output (Gemma 2/3, OLMo 2)
    mlp_norm: ClassVar[Optional[str]] = "post_attention_layernorm"
    mlp_post_norm: ClassVar[Optional[str]] = None
    final_norm: ClassVar[str] = "model.norm"
    # roles: q/k/v/o, or qkv (``qkv_layout``: "stacked" = all q rows, then k, then v; "interleaved" = per head
    # q, k, v rows) and o; gate/up/down, gate_up (gate rows then up rows) and down, or up/down
    attention_roles: ClassVar[dict[str, str]] = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"}
    mlp_roles: ClassVar[dict[str, str]] = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    qkv_layout: ClassVar[str] = "stacked"
    head_norms: ClassVar[dict[str, str]] = {}  # norm module -> the role whose rows it follows (OLMo 2)
    renumber_kv_layers: ClassVar[bool] = True  # False where cache layers have per-layer types (Gemma 2/3)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = getattr(model, "config", None)
        self.blocks_prefix, self.blocks = find_blocks(model)
        self._check_structure()

    def _check_structure(self) -> None:
        for index, block in enumerate(self.blocks):
            for sub, roles in ((self.attention_module, self.attention_roles), (self.mlp_module, self.mlp_roles)):
                try:
                    module = block.get_submodule(sub)
                except AttributeError:
                    module = None
                if module is None:
                    raise UnsupportedArchitectureError(
                        f"{type(self).__name__} cannot handle block {index} of {type(self.model).__name__}: "
                        f"it has no {sub} module.")
                if is_removed(module):
                    continue
                missing = [f"{sub}.{leaf}" for leaf in roles.values() if not _has_linear(block, f"{sub}.{leaf}")]
                if missing:
                    raise UnsupportedArchitectureError(
                        f"{type(self).__name__} cannot handle block {index} of {type(self.model).__name__}: "
                        f"missing linear layer(s) {', '.join(missing)}."
                    )

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def parallel_residual(self) -> bool:
        """True when a block's MLP reads the block input rather than the attention's output (GPT-NeoX)."""
        return False

    def block_name(self, index: int) -> str:
        return f"{self.blocks_prefix}.{index}"

    def attention(self, index: int) -> Sublayer:
        return self._sublayer("attention", index, self.attention_module, self.attention_roles)

    def mlp(self, index: int) -> Sublayer:
        return self._sublayer("mlp", index, self.mlp_module, self.mlp_roles)

    def sublayers(self, index: int) -> list[Sublayer]:
        """The block's attention and MLP sublayers that are still present, in forward order."""
        return [s for s in (self.attention(index), self.mlp(index)) if not s.removed]

    def all_sublayers(self) -> list[Sublayer]:
        """Every present sublayer of the model, in forward order."""
        return [s for index in range(self.num_blocks) for s in self.sublayers(index)]

    def _sublayer(self, kind: str, index: int, attr: str, roles: dict[str, str]) -> Sublayer:
        module = self.blocks[index].get_submodule(attr)
        if is_removed(module):
            return Sublayer(kind, index, f"{self.block_name(index)}.{attr}", module, {}, removed=True)
        linears = {role: module.get_submodule(leaf) for role, leaf in roles.items()}
        return Sublayer(kind, index, f"{self.block_name(index)}.{attr}", module, linears)

    def sublayer(self, name: str) -> Sublayer:
        """The sublayer with full name ``name`` (``model.layers.7.self_attn``), present or removed."""
        for index in range(self.num_blocks):
            for sub in (self.attention(index), self.mlp(index)):
                if sub.name == name:
                    return sub
        raise KeyError(name)

    def _norms(self, kind: str) -> tuple[Optional[str], Optional[str]]:
        """(pre-norm, post-norm) attribute names of a sublayer kind."""
        if kind == "attention":
            return self.attention_norm, self.attention_post_norm
        return self.mlp_norm, self.mlp_post_norm

    def remove(self, sublayer: Sublayer) -> SwapLog:
        """Delete a sublayer: it and its norms are replaced by parameter-free stand-ins whose output adds nothing
        to the residual stream. Attention layers left are renumbered for the KV cache. Returns the edits, whose
        ``undo`` puts the very modules back (and numbers the attention layers again)."""
        log = SwapLog()
        block = self.blocks[sublayer.block]
        for attr, stand_in in self.stand_ins(sublayer.kind):
            log.replace(block, attr, stand_in)
        self.renumber_attention()
        log.after_undo(self.renumber_attention)
        return log

    def stand_ins(self, kind: str) -> list[tuple[str, nn.Module]]:
        """What removing a sublayer of ``kind`` puts in its block: (attribute path, parameter-free stand-in) for
        the sublayer and its norms. Callers that switch often (runtime profiles) build these once and reuse them."""
        attr = self.attention_module if kind == "attention" else self.mlp_module
        return [(attr, RemovedSublayer(kind))] + [(norm, SkippedNorm()) for norm in self._norms(kind) if norm is not None]

    def renumber_attention(self) -> None:
        """Consecutive ``layer_idx`` for the attention layers left, so the KV cache's first layer is a real one."""
        for attention, index in self.attention_numbering():
            attention.layer_idx = index

    def attention_numbering(self) -> list[tuple[nn.Module, int]]:
        """(attention module, consecutive ``layer_idx``) for the attention layers present: what
        ``renumber_attention`` sets. Empty for families whose cache layers have per-layer types (Gemma's sliding
        and global layers): they keep their numbers, as renumbering would hand a layer another type's cache."""
        if not self.renumber_kv_layers:
            return []
        present = [s.module for index in range(self.num_blocks) for s in [self.attention(index)] if not s.removed]
        return [(attention, index) for index, attention in enumerate(present) if hasattr(attention, "layer_idx")]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last block's output: the final norm, the output embedding, and the
        family's final soft-capping where it has one (Gemma 2)."""
        logits = self.model.get_output_embeddings()(self.model.get_submodule(self.final_norm)(hidden))
        cap = getattr(self.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def sublayer_forward(self, sublayer: Sublayer, hidden: torch.Tensor, block_kwargs: dict[str, Any],
                         block_input: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` + the sublayer's output: one half of a block's forward. With a parallel residual the MLP
        reads ``block_input`` (the block's input) instead of ``hidden``."""
        if sublayer.removed:
            return hidden
        block = self.blocks[sublayer.block]
        pre, post = self._norms(sublayer.kind)
        source = block_input if (sublayer.kind == "mlp" and self.parallel_residual) else hidden
        x = block.get_submodule(pre)(source) if pre is not None else source
        if sublayer.kind == "attention":
            out = sublayer.module(hidden_states=x, **block_kwargs)[0]
        else:
            out = sublayer.module(x)
        if post is not None:
            out = block.get_submodule(post)(out)
        return hidden + out

    def head_dim(self, attention: nn.Module | None) -> int:
        config = self.config
        head_dim = getattr(attention, "head_dim", None) or getattr(attention, "head_size", None) \
            or getattr(config, "head_dim", None)
        if not head_dim:
            head_dim = config.hidden_size // config.num_attention_heads
        return int(head_dim)

    def head_geometry(self, index: int) -> HeadGeometry:
        attention = self.attention(index)
        d = self.head_dim(attention.module)
        linears = attention.linears
        heads = linears["o"].in_features // d
        if "q" in linears:
            kv_heads = linears["k"].out_features // d
        elif self.qkv_layout == "stacked":
            kv_heads = (linears["qkv"].out_features - heads * d) // (2 * d)
        else:  # interleaved q/k/v per head: no grouped-query attention
            kv_heads = heads
        return HeadGeometry(num_heads=heads, num_kv_heads=kv_heads, head_dim=d)

    def ffn_width(self, index: int) -> int:
        return self.mlp(index).linears["down"].in_features

    def attention_layout(self, index: int) -> UnitLayout:
        """Where each KV group of block ``index`` lies in its attention's tensors."""
        attention = self.attention(index)
        geometry = self.head_geometry(index)
        d, size, heads, kv = geometry.head_dim, geometry.group_size, geometry.num_heads, geometry.num_kv_heads
        roles = self.attention_roles
        rows: dict[str, tuple[tuple[int, int], ...]] = {}
        if "q" in attention.linears:
            rows = {"q": ((0, size * d),), "k": ((0, d),), "v": ((0, d),)}
        elif self.qkv_layout == "stacked":
            rows = {"qkv": ((0, size * d), (heads * d, d), ((heads + kv) * d, d))}
        else:
            rows = {"qkv": ((0, 3 * d),)}
        slots = []
        for role, segments in rows.items():
            slots += _row_slots(roles[role], attention.linears[role], segments)
        for norm, role in self.head_norms.items():
            slots.append(Slot(norm, "weight", 0, rows[role]))
        output = Slot(roles["o"], "weight", 1, ((0, size * d),))
        return UnitLayout("attention", kv, (*slots, output), output)

    def mlp_layout(self, index: int) -> UnitLayout:
        """Where each FFN channel of block ``index`` lies in its MLP's tensors."""
        mlp = self.mlp(index)
        width = self.ffn_width(index)
        roles = self.mlp_roles
        slots = []
        for role in ("gate", "up"):
            if role in mlp.linears:
                slots += _row_slots(roles[role], mlp.linears[role], ((0, 1),))
        if "gate_up" in mlp.linears:
            slots += _row_slots(roles["gate_up"], mlp.linears["gate_up"], ((0, 1), (width, 1)))
        output = Slot(roles["down"], "weight", 1, ((0, 1),))
        return UnitLayout("mlp", width, (*slots, output), output)

    def layout(self, sublayer: Sublayer) -> UnitLayout:
        return self.attention_layout(sublayer.block) if sublayer.kind == "attention" else self.mlp_layout(sublayer.block)

    @torch.no_grad()
    def order_units(self, groups: dict[int, list[int]], channels: dict[int, list[int]]) -> None:
        """Permute each listed block's KV groups and FFN channels into the given order, in place (``keep_units``
        with every unit): the function is unchanged, though sums over a permuted inner dimension may round
        differently in the last bit. The runtime's profiles and the joint search's level bank keep prefixes."""
        for block, order in groups.items():
            if order != sorted(order):  # already in order: keep the very tensors
                keep_units(self.attention(block).module, self.attention_layout(block), order)
        for block, order in channels.items():
            if order != sorted(order):
                keep_units(self.mlp(block).module, self.mlp_layout(block), order)

    def fit_heads(self, index: int) -> None:
        """After block ``index``'s attention changed width: give its module the head counts it now has (a copy
        of the config where the family reads head counts from it, as Phi-3 does)."""
        attention = self.attention(index)
        if attention.removed:
            return
        geometry = self.head_geometry(index)
        set_head_counts(attention.module, geometry.num_heads, geometry.num_kv_heads)


def _row_slots(path: str, linear: nn.Module, segments: tuple[tuple[int, int], ...]) -> list[Slot]:
    """A linear's weight rows (and its bias, when it has one) along ``segments``."""
    slots = [Slot(path, "weight", 0, segments)]
    if getattr(linear, "bias", None) is not None:
        slots.append(Slot(path, "bias", 0, segments))
    return slots


def _has_linear(block: nn.Module, path: str) -> bool:
    try:
        return is_linear_like(block.get_submodule(path))
    except AttributeError:
        return False


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``model``'s family, or a clear error naming what is unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return adapter_class(model_type)(model)


def adapter_class(model_type: str) -> type[ModelAdapter]:
    """The adapter class for a ``config.model_type``, or ``UnsupportedArchitectureError`` (checkable from a
    config.json before any weights load)."""
    for name in ADAPTERS:
        adapter_cls = ADAPTERS.get(name)
        if model_type in adapter_cls.model_types:
            return adapter_cls
    supported = sorted(t for name in ADAPTERS for t in ADAPTERS.get(name).model_types)
    raise UnsupportedArchitectureError(
        f"Structural compression does not support model type '{model_type}' (supported: {', '.join(supported)}); "
        "unstructured pruning and quantization still work on it."
    )
