"""What healing trains: every weight of the student, or (``lora``) peft LoRA adapters on its decoder linears,
merged back into the weights afterwards so the saved model keeps its pruned shapes and plain linears."""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..config import HealSetting
from ..models.adapter import get_adapter


def lora_targets(model: nn.Module) -> list[str]:
    """Leaf names of the decoder linears still present (q_proj, ..., down_proj) for peft's ``target_modules``."""
    adapter = get_adapter(model)
    present = {role for sublayer in adapter.all_sublayers() for role in sublayer.linears}
    roles = {**adapter.attention_roles, **adapter.mlp_roles}
    return sorted(roles[role] for role in present)


@contextlib.contextmanager
def lora_adapters(model: nn.Module, setting: HealSetting) -> Iterator[nn.Module]:
    """Yield the module to train: ``model`` with every parameter trainable, or for ``lora`` a peft wrapper with
    only the adapters trainable; on exit adapters are merged in place and trainable flags restored."""
    flags = {p: p.requires_grad for p in model.parameters()}
    if setting.method != "lora":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        try:
            yield model
        finally:
            model.eval()
            for parameter, flag in flags.items():
                parameter.requires_grad_(flag)
        return
    from peft import LoraConfig, get_peft_model  # optional at import time: only LoRA healing needs peft

    config = LoraConfig(r=setting.lora_rank, lora_alpha=setting.lora_alpha, lora_dropout=0.0,
                        target_modules=lora_targets(model), bias="none")
    wrapped = get_peft_model(model, config)
    try:
        yield wrapped
    finally:
        wrapped.eval()
        wrapped.merge_and_unload()
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
