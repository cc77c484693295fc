"""ModelAdapter: the only code that knows a family's module names; one registered class per layout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import UnsupportedArchitectureError
from ..registry import Registry
from .discovery import find_blocks

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
    """One attention or MLP sublayer of a block, with its linears by role."""

    kind: str
    block: int
    name: str
    module: nn.Module
    linears: dict[str, nn.Linear]


class ModelAdapter:
    """Structure of a decoder family: blocks, sublayers, linears by role and head geometry.

    Subclasses name their modules in the class attributes below and register with ``ADAPTERS``.
    """

    model_types: ClassVar[tuple[str, ...]] = ()
    attention_module: ClassVar[str]
    mlp_module: ClassVar[str]
    attention_roles: ClassVar[dict[str, str]]
    mlp_roles: ClassVar[dict[str, str]]

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.blocks_prefix, self.blocks = find_blocks(model)
        self._check_structure()

    def _check_structure(self) -> None:
        for index, block in enumerate(self.blocks):
            for sub, roles in ((self.attention_module, self.attention_roles), (self.mlp_module, self.mlp_roles)):
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
        return [self.attention(index), self.mlp(index)]

    def _sublayer(self, kind: str, index: int, attr: str, roles: dict[str, str]) -> Sublayer:
        module = self.blocks[index].get_submodule(attr)
        linears = {role: module.get_submodule(leaf) for role, leaf in roles.items()}
        return Sublayer(kind, index, f"{self.block_name(index)}.{attr}", module, linears)

    def head_geometry(self, index: int) -> HeadGeometry:
        attention = self.attention(index)
        head_dim = self._head_dim(attention.module)
        return HeadGeometry(
            num_heads=attention.linears["q"].out_features // head_dim,
            num_kv_heads=attention.linears["k"].out_features // head_dim,
            head_dim=head_dim,
        )

    def ffn_width(self, index: int) -> int:
        return self.mlp(index).linears["down"].in_features

    def _head_dim(self, attention: nn.Module) -> int:
        config = getattr(self.model, "config", None)
        head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
        if not head_dim:
            head_dim = config.hidden_size // config.num_attention_heads
        return int(head_dim)


def _has_linear(block: nn.Module, path: str) -> bool:
    try:
        return isinstance(block.get_submodule(path), nn.Linear)
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
