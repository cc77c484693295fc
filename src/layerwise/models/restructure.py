"""Reload a saved model whose plan changed its structure (removed sublayers; sliced widths later): build the
architecture from config.json, replay the plan's structural actions, then load the saved tensors strictly."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from ..errors import ModelNotFoundError
from ..registry import Registry

if TYPE_CHECKING:
    from ..plan import Action

# op -> how to rebuild a saved model's modules before its weights load (shapes only: no data needed); the
# ops register theirs, so loading a model never imports them
STRUCTURE_REPLAY: Registry[Callable[[torch.nn.Module, list["Action"]], None]] = Registry("structural operation")


def load_restructured(path: Path, actions: list["Action"]) -> PreTrainedModel:
    """The model saved at ``path`` after ``actions`` (structural plan actions) changed its modules."""

    config = AutoConfig.from_pretrained(path)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    by_op: dict[str, list] = {}
    for action in actions:
        by_op.setdefault(action.op, []).append(action)
    for op, group in by_op.items():
        STRUCTURE_REPLAY.get(op)(model, group)
    state: dict[str, torch.Tensor] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"Cannot load the model directory {path}: it holds no .safetensors weights.")
    for file in files:
        try:
            state.update(load_file(file))
        except (SafetensorError, OSError) as exc:
            raise ModelNotFoundError(f"Cannot load the model directory {path}: {file.name} is truncated or "
                                     f"corrupt ({str(exc).splitlines()[0]}).") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    model.tie_weights()
    untied = [key for key in missing if not _is_tied(model, key, state)]
    if untied or unexpected:
        problem = f"missing {untied[0]}" if untied else f"unexpected {unexpected[0]}"
        raise ModelNotFoundError(f"Cannot load the model directory {path}: its weights do not fit its plan ({problem}).")
    return model.eval()


def _is_tied(model: PreTrainedModel, key: str, state: dict[str, torch.Tensor]) -> bool:
    """True when the parameter ``key`` shares storage with one that was loaded (tied embeddings)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    pointer = params[key].data_ptr()
    return any(name in state and name != key and param.data_ptr() == pointer for name, param in params.items())
