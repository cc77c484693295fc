"""Generic discovery of decoder blocks and their linears: works on any decoder-only model, no adapter."""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedArchitectureError

# Module types that act as a block's linear layers: nn.Linear, plus what ops put in its place
# (a quantized linear registers itself here), so a compressed model's blocks are still found.
LINEAR_LIKE: list[type[nn.Module]] = [nn.Linear]
# Module types that store a linear's weight quantized (``in_features × out_features`` weights in fewer bytes);
# each quantization backend registers its module here.
QUANTIZED_LINEARS: list[type[nn.Module]] = []


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, tuple(LINEAR_LIKE))


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of repeated decoder blocks: the largest list of same-type entries holding nn.Linear
    layers (a block emptied by depth pruning still counts)."""
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if not any(is_linear_like(m) for block in module for m in block.modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, module)
    if best is None:
        raise UnsupportedArchitectureError(
            f"Found no list of decoder blocks built from nn.Linear in {type(model).__name__}."
        )
    return best[1], best[2]


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside the decoder blocks, by full module name, in block order (a quantized linear
    is no longer one). Embeddings and the LM head live outside the blocks and are never returned.
    """
    prefix, blocks = find_blocks(model)
    linears: dict[str, nn.Linear] = {}
    for index, block in enumerate(blocks):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                linears[f"{prefix}.{index}.{name}"] = module
    return linears


def block_index(unit: str, blocks_prefix: str) -> int:
    """The block number in a unit name such as ``model.layers.3.mlp.down_proj``."""
    rest = unit[len(blocks_prefix) + 1 :]
    return int(rest.split(".", 1)[0])
