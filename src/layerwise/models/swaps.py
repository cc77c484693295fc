"""Reversible edits of a model in place, the one mechanism behind every temporary change: removing a sublayer
for a search, the joint search's level bank, SPRINT's tuned slices and the runtime's profiles. Each edit records
what it replaced; ``undo`` puts back the very objects, last first, then runs the follow-ups (e.g. renumbering the
KV-cache layers) that depend on the model as it is after the undo."""

from __future__ import annotations

import copy
from typing import Any, Callable

from torch import nn


def set_head_counts(module: nn.Module, heads: int, kv_heads: int) -> dict[str, Any]:
    """Set an attention module's own head counts (attributes and a private config copy); returns what was
    there before (attribute -> value), which ``SwapLog.head_counts`` puts back on undo."""
    previous: dict[str, Any] = {}
    for name, value in (("num_heads", heads), ("num_key_value_heads", kv_heads), ("num_attention_heads", heads)):
        if hasattr(module, name) and isinstance(getattr(module, name), int):
            previous[name] = getattr(module, name)
            setattr(module, name, value)
    config = getattr(module, "config", None)
    changed = config is not None and (getattr(config, "num_attention_heads", heads),
                                      getattr(config, "num_key_value_heads", kv_heads)) != (heads, kv_heads)
    if changed:
        previous["config"] = config
        own = copy.copy(config)
        own.num_attention_heads = heads
        own.num_key_value_heads = kv_heads
        module.config = own
    return previous


class SwapLog:
    """Edits made through it, undone exactly by ``undo`` (also as a context manager: undone on exit)."""

    def __init__(self) -> None:
        self._replaced: list[tuple[Any, str, Any]] = []  # (object, attribute, the value that was there)
        self._after_undo: list[Callable[[], None]] = []

    def set(self, owner: Any, attr: str, value: Any) -> None:
        """``owner.attr = value`` (a submodule, a tensor's ``data``, a plain number), remembering the old value."""
        self._replaced.append((owner, attr, getattr(owner, attr)))
        setattr(owner, attr, value)

    def replace(self, root: nn.Module, path: str, module: nn.Module) -> None:
        """Put ``module`` at the dotted ``path`` under ``root``."""
        prefix, _, attr = path.rpartition(".")
        self.set(root.get_submodule(prefix) if prefix else root, attr, module)

    def head_counts(self, attention: nn.Module, heads: int, kv_heads: int) -> None:
        """Give an attention module other head counts (its attributes and a private config copy)."""
        for attr, old in set_head_counts(attention, heads, kv_heads).items():
            self._replaced.append((attention, attr, old))

    def after_undo(self, step: Callable[[], None]) -> None:
        """Run ``step`` after every undo of this log (once per registration)."""
        self._after_undo.append(step)

    def undo(self) -> None:
        for owner, attr, old in reversed(self._replaced):
            setattr(owner, attr, old)
        self._replaced.clear()
        steps, self._after_undo = self._after_undo, []
        for step in steps:
            step()

    def __enter__(self) -> SwapLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.undo()
