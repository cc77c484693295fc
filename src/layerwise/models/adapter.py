"""ModelAdapter: the only code that knows a family's module names; one registered class per layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import UnsupportedArchitectureError
from ..registry import Registry
from .discovery import find_blocks, is_linear_like

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


@dataclass(frozen=True)
class RemovedModules:
    """What ``ModelAdapter.remove`` took out of a block: the sublayer and its pre-norm, by attribute."""

    block: int
    attr: str
    module: nn.Module
    norm_name: str
    norm: nn.Module


class RemovedSublayer(nn.Module):
    """Stands in for a deleted attention or MLP: adds nothing to the residual stream, costs nothing."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        zero = hidden_states.new_zeros(())  # broadcasts in the residual add; no full-size tensor
        return (zero, None) if self.kind == "attention" else zero

    def extra_repr(self) -> str:
        return f"removed {self.kind}"


class SkippedNorm(nn.Module):
    """The pre-norm of a removed sublayer: its output is unused, so it does no work."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


def is_removed(module: nn.Module) -> bool:
    return isinstance(module, RemovedSublayer)


class ModelAdapter:
    """Structure of a decoder family: blocks, sublayers, linears by role and head geometry.

    Subclasses name their modules in the class attributes below and register with ``ADAPTERS``.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    attention_module: ClassVar[str]
    mlp_module: ClassVar[str]
    attention_norm: ClassVar[str]  # the pre-norm feeding attention (skipped with it when it is removed)
    mlp_norm: ClassVar[str]
    final_norm: ClassVar[str]
    attention_roles: ClassVar[dict[str, str]]
    mlp_roles: ClassVar[dict[str, str]]

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks_prefix, self.blocks = find_blocks(model)
        self._check_structure()

    def _check_structure(self) -> None:
        for index, block in enumerate(self.blocks):
            for sub, roles in ((self.attention_module, self.attention_roles), (self.mlp_module, self.mlp_roles)):
                if is_removed(block.get_submodule(sub)):
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

    def _norm_name(self, kind: str) -> str:
        return self.attention_norm if kind == "attention" else self.mlp_norm

    def remove(self, sublayer: Sublayer) -> RemovedModules:
        """Delete a sublayer: its module and its pre-norm are replaced by parameter-free stand-ins whose
        output adds nothing to the residual stream. Attention layers left are renumbered for the KV cache.
        Returns what was taken out, for ``restore``."""
        block = self.blocks[sublayer.block]
        attr = self.attention_module if sublayer.kind == "attention" else self.mlp_module
        norm_name = self._norm_name(sublayer.kind)
        taken = RemovedModules(sublayer.block, attr, sublayer.module, norm_name, block.get_submodule(norm_name))
        block.set_submodule(attr, RemovedSublayer(sublayer.kind))
        block.set_submodule(norm_name, SkippedNorm())
        self.renumber_attention()
        return taken

    def restore(self, taken: RemovedModules) -> None:
        """Put back the very modules ``remove`` took out."""
        block = self.blocks[taken.block]
        block.set_submodule(taken.attr, taken.module)
        block.set_submodule(taken.norm_name, taken.norm)
        self.renumber_attention()

    def renumber_attention(self) -> None:
        """Consecutive ``layer_idx`` for the attention layers left, so the KV cache's first layer is a real one."""
        present = [s.module for index in range(self.num_blocks) for s in [self.attention(index)] if not s.removed]
        for new_index, attention in enumerate(present):
            if hasattr(attention, "layer_idx"):
                attention.layer_idx = new_index

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last block's output: the final norm, then the output embedding."""
        return self.model.get_output_embeddings()(self.model.get_submodule(self.final_norm)(hidden))

    def sublayer_forward(self, sublayer: Sublayer, hidden: torch.Tensor, block_kwargs: dict[str, Any]) -> torch.Tensor:
        """``hidden`` + the sublayer's output on its pre-normed input: one half of a pre-norm block's forward."""
        if sublayer.removed:
            return hidden
        norm = self.blocks[sublayer.block].get_submodule(self._norm_name(sublayer.kind))
        if sublayer.kind == "attention":
            out = sublayer.module(hidden_states=norm(hidden), **block_kwargs)[0]
        else:
            out = sublayer.module(norm(hidden))
        return hidden + out

    def head_geometry(self, index: int) -> HeadGeometry:
        attention = self.attention(index)
        head_dim = self.head_dim(attention.module)
        return HeadGeometry(
            num_heads=attention.linears["q"].out_features // head_dim,
            num_kv_heads=attention.linears["k"].out_features // head_dim,
            head_dim=head_dim,
        )

    def ffn_width(self, index: int) -> int:
        return self.mlp(index).linears["down"].in_features

    def head_dim(self, attention: nn.Module | None) -> int:
        config = getattr(self.model, "config", None)
        head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
        if not head_dim:
            head_dim = config.hidden_size // config.num_attention_heads
        return int(head_dim)


def _has_linear(block: nn.Module, path: str) -> bool:
    try:
        return is_linear_like(block.get_submodule(path))
    except AttributeError:
        return False


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The registered adapter for ``model``'s family, or a clear error naming what is unsupported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    for name in ADAPTERS:
        adapter_cls = ADAPTERS.get(name)
        if model_type in adapter_cls.model_types:
            return adapter_cls(model)
    supported = sorted(t for name in ADAPTERS for t in ADAPTERS.get(name).model_types)
    raise UnsupportedArchitectureError(
        f"Structural compression does not support model type '{model_type}' (supported: {', '.join(supported)}); "
        "unstructured pruning and quantization still work on it."
    )
