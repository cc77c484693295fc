"""Reversible runtime pruning profiles: the dense model plus a set of lighter variants that a controller can
switch between per request, in milliseconds and without reloading.

Kinds (``PROFILE_KINDS``) and their default intensities (the runtime-pruning seed's 0.3 / 0.4 / 0.5 / 0.3
with one lighter and one heavier level each):

- ``kv_cache``: evict that fraction of the KV cache while decoding (keep the first ``sink`` tokens and the
  most recent ones); the weights are untouched, the generator applies it (``KvEviction``);
- ``attention_heads``: drop that fraction of all KV groups (with their query heads), lowest-scored first;
- ``ffn_neurons``: drop that fraction of every block's FFN channels;
- ``transformer_layers``: skip that fraction of the blocks (both sublayers), least important first.

Heads and channels are ranked once by importance from the calibration Profile (``act``: ‖X_col‖·‖W_col‖) or
Taylor scores, and the dense model is reordered once so that every block's units lie in importance order (a
function-preserving permutation of q/k/v rows and o columns per KV group, gate/up rows and down columns).
A profile then keeps a *prefix* of each block's units, by one of two mechanisms (``MECHANISMS``):

- ``mask``: forward pre-hooks zero the dropped inputs of o_proj / down_proj (no speedup, exact semantics);
- ``sliced``: pre-built smaller linears whose weights are views of the dense weights' prefix rows / columns
  (real speedup, no copy of any tensor); switching swaps modules.

Blocks are skipped through the adapter's reversible removal. Restoring puts back the very modules and hooks
it took, so the dense logits are bit-identical afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..calibration.width import block_similarity
from ..errors import LayerwiseError
from ..models.adapter import ModelAdapter, get_adapter
from ..models.swaps import SwapLog
from ..models.width import UnitMask, prefix_modules
from ..registry import Registry

PROFILE_KINDS = ("none", "kv_cache", "attention_heads", "ffn_neurons", "transformer_layers")
DEFAULT_INTENSITIES: dict[str, tuple[float, ...]] = {
    "kv_cache": (0.15, 0.3, 0.5),
    "attention_heads": (0.2, 0.4, 0.6),
    "ffn_neurons": (0.25, 0.5, 0.7),
    "transformer_layers": (0.15, 0.3, 0.45),
}


class ProfileError(LayerwiseError):
    """An unknown profile, or one that cannot apply to this model."""


@dataclass(frozen=True)
class ProfileSpec:
    """One profile: a kind and the fraction of its units it removes."""

    kind: str
    intensity: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in PROFILE_KINDS:
            raise ProfileError(f"Unknown profile kind '{self.kind}' (known: {', '.join(PROFILE_KINDS)}).")
        if self.kind != "none" and not 0.0 < self.intensity < 1.0:
            raise ProfileError(f"Profile intensity must lie in (0, 1) (got {self.intensity} for {self.kind}).")

    @property
    def name(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}@{self.intensity:g}"

    @classmethod
    def parse(cls, name: str) -> "ProfileSpec":
        """``none`` or ``kind@intensity``."""
        if name == "none":
            return cls("none")
        kind, _, value = name.partition("@")
        try:
            return cls(kind, float(value))
        except ValueError:
            raise ProfileError(f"A profile is 'none' or 'kind@intensity' (got '{name}').") from None


def parse_profiles(text: str) -> list[ProfileSpec]:
    """``none,ffn_neurons@0.5,...`` as profile specs (``none`` first whether listed or not); empty: the defaults."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names:
        return default_specs()
    return list(dict.fromkeys(ProfileSpec.parse(name) for name in ["none", *names]))


def default_specs() -> list[ProfileSpec]:
    """``none`` and every kind at each of its default intensities."""
    return [ProfileSpec("none")] + [ProfileSpec(kind, level) for kind, levels in DEFAULT_INTENSITIES.items()
                                    for level in levels]


@dataclass(frozen=True)
class KvEviction:
    """Keep the first ``sink`` cached tokens and the most recent ones, dropping ``fraction`` of the cache."""

    fraction: float
    sink: int = 4

    def keep(self, length: int) -> int:
        """How many cached tokens to keep of ``length``."""
        return max(min(length, self.sink + 1), length - int(self.fraction * length))


@dataclass
class Importance:
    """Per block, KV groups (with their scores) and FFN channels most important first, and the blocks least
    important first."""

    groups: dict[int, list[int]]
    channels: dict[int, list[int]]
    blocks: list[int]
    group_scores: dict[int, list[float]] = field(default_factory=dict)

    def kept_groups(self, intensity: float) -> dict[int, int]:
        """KV groups kept per block when ``intensity`` of all groups go, the lowest *share of its block's score*
        across the model first (a block keeps at least one). Raw scores grow with depth (activation norms do), so
        ranking them globally strips the early blocks (on smollm2-135m, 20% by raw score left blocks 0-9 one
        group each: reference PPL 2 → 2000); a per-block fraction would only know thirds with 3 groups a block."""
        total = sum(len(order) for order in self.groups.values())
        drop = total - kept_count(total, intensity)
        ranked = sorted((score / (sum(scores) or 1.0), block) for block, scores in self.group_scores.items()
                        for score in scores)
        kept = {block: len(order) for block, order in self.groups.items()}
        for _score, block in ranked:
            if drop == 0:
                break
            if kept[block] > 1:
                kept[block] -= 1
                drop -= 1
        return kept

    @classmethod
    def from_calibration(cls, model: nn.Module, calibration: Any, method: str = "act") -> "Importance":
        """Width scores (``WIDTH_SCORERS``) and block redundancy (cosine of block input and output)."""

        scores = calibration.width_scores(method)
        similarity = block_similarity(model, calibration.tokens(), calibration.settings.calib_batch_size)
        blocks = sorted(similarity, key=lambda b: (-similarity[b], b))  # most redundant (output ≈ input) first
        return cls({b: scores.ranked_groups(b) for b in scores.groups},
                   {b: scores.ranked_channels(b) for b in scores.channels}, blocks,
                   {b: sorted((float(v) for v in scores.groups[b]), reverse=True) for b in scores.groups})


@torch.no_grad()
def order_by_importance(model: nn.Module, importance: Importance) -> None:
    """Permute every block's KV groups and FFN channels into importance order, in place (``order_units``);
    ``importance`` then lists each block's units as 0, 1, 2, ..."""
    get_adapter(model).order_units(importance.groups, importance.channels)
    importance.groups = {b: list(range(len(o))) for b, o in importance.groups.items()}
    importance.channels = {b: list(range(len(o))) for b, o in importance.channels.items()}


def kept_count(total: int, intensity: float, unit: int = 1) -> int:
    """Units kept of ``total`` when ``intensity`` of them go, in multiples of ``unit``, never fewer than one unit."""
    kept = round(total * (1 - intensity) / unit) * unit
    return max(unit, min(total, kept))


class Switch:
    """What activating one profile changed, and how to undo it."""

    def __init__(self, undo: Callable[[], None]) -> None:
        self.undo = undo


@dataclass
class Swaps:
    """A profile as module replacements — (parent module, attribute path, replacement) — and head counts to set,
    built once and replayed on every activation from the dense model: switching then only re-links modules and
    sets numbers, instead of rebuilding views and stand-ins each time. The replacements are views of the dense
    weights, so a cached profile stays exact as long as the dense tensors are not replaced."""

    modules: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    head_counts: list[tuple[nn.Module, int, int]] = field(default_factory=list)
    renumber: ModelAdapter | None = None  # blocks were removed: renumber the KV-cache layers after each switch
    # resolved on the first activation, so later ones do no lookups: (owning module, attribute, replacement) and
    # the KV-cache layer numbers the profile needs (a switch is in each request's latency, under any load)
    _links: list[tuple[nn.Module, str, nn.Module]] | None = field(default=None, repr=False)
    _numbering: list[tuple[nn.Module, int]] | None = field(default=None, repr=False)

    def apply(self) -> Switch:
        if self._links is None:
            self._links = [(*_owner(parent, name), new) for parent, name, new in self.modules]
        edits = SwapLog()
        for owner, attr, new in self._links:
            edits.set(owner, attr, new)
        for module, heads, kv in self.head_counts:
            edits.head_counts(module, heads, kv)
        if self._numbering is None:
            self._numbering = self.renumber.attention_numbering() if self.renumber is not None else []
        for attention, index in self._numbering:
            edits.set(attention, "layer_idx", index)
        return Switch(edits.undo)


def _owner(parent: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The module that holds the last attribute of a dotted ``path`` under ``parent``, and that attribute."""
    prefix, _, attr = path.rpartition(".")
    return (parent.get_submodule(prefix) if prefix else parent), attr


Engage = Callable[["ModelAdapter", "Importance", float], "Switch | Swaps"]
MECHANISMS: Registry[dict[str, Engage]] = Registry("profile mechanism")


def _sliced_heads(adapter: ModelAdapter, importance: Importance, intensity: float) -> Swaps:
    swaps = Swaps()
    for block, kept in importance.kept_groups(intensity).items():
        geometry = adapter.head_geometry(block)
        sublayer = adapter.attention(block)
        replacements = prefix_modules(sublayer.module, adapter.attention_layout(block), kept)
        swaps.modules += [(sublayer.module, name, new) for name, new in replacements.items()]
        swaps.head_counts.append((sublayer.module, kept * geometry.group_size, kept))
    return swaps


def _sliced_ffn(adapter: ModelAdapter, importance: Importance, intensity: float) -> Swaps:
    swaps = Swaps()
    for block in importance.channels:
        kept = kept_count(adapter.ffn_width(block), intensity)
        sublayer = adapter.mlp(block)
        replacements = prefix_modules(sublayer.module, adapter.mlp_layout(block), kept)
        swaps.modules += [(sublayer.module, name, new) for name, new in replacements.items()]
    return swaps


def _masked(kind: str) -> Engage:
    """Zero the dropped units at the input of the output projection (o_proj for heads, down_proj for channels)."""

    def engage(adapter: ModelAdapter, importance: Importance, intensity: float) -> Switch:
        masks = []
        groups = importance.kept_groups(intensity) if kind == "attention_heads" else {}
        for block in (groups if kind == "attention_heads" else importance.channels):
            sublayer = adapter.attention(block) if kind == "attention_heads" else adapter.mlp(block)
            mask = UnitMask(sublayer.module, adapter.layout(sublayer))
            kept = groups[block] if kind == "attention_heads" else kept_count(mask.layout.units, intensity)
            mask.set(range(kept, mask.layout.units))
            masks.append(mask)
        return Switch(lambda: [mask.remove() for mask in masks])

    return engage


def _skip_blocks(adapter: ModelAdapter, importance: Importance, intensity: float) -> Swaps:
    """Remove both sublayers of the least important blocks (the adapter's stand-ins, as its removal puts)."""
    count = min(len(importance.blocks) - 1, max(1, round(intensity * len(importance.blocks))))
    swaps = Swaps(renumber=adapter)
    for block in importance.blocks[:count]:
        for sublayer in adapter.sublayers(block):
            swaps.modules += [(adapter.blocks[block], attr, new) for attr, new in adapter.stand_ins(sublayer.kind)]
    return swaps


def _untouched(adapter: ModelAdapter, importance: Importance, intensity: float) -> Switch:
    return Switch(lambda: None)


MECHANISMS.add("sliced", {"attention_heads": _sliced_heads, "ffn_neurons": _sliced_ffn,
                          "transformer_layers": _skip_blocks, "kv_cache": _untouched, "none": _untouched})
MECHANISMS.add("mask", {"attention_heads": _masked("attention_heads"), "ffn_neurons": _masked("ffn_neurons"),
                        "transformer_layers": _skip_blocks, "kv_cache": _untouched, "none": _untouched})


@dataclass
class ProfileSet:
    """The dense model and its profiles; ``activate(name)`` switches, ``restore()`` returns to dense."""

    model: nn.Module
    importance: Importance
    specs: list[ProfileSpec] = field(default_factory=default_specs)
    mechanism: str = "sliced"
    sink: int = 4
    active: ProfileSpec = field(default_factory=lambda: ProfileSpec("none"))
    _switch: Switch | None = field(default=None, repr=False)
    _built: dict[str, Swaps] = field(default_factory=dict, repr=False)  # profiles as cached module swaps

    def __post_init__(self) -> None:
        self.adapter = get_adapter(self.model)
        self.engagers = MECHANISMS.get(self.mechanism)
        order_by_importance(self.model, self.importance)
        for name in self.names:  # build every profile once, so that no request pays for building one
            self.activate(name)
        self.restore()

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def spec(self, name: str) -> ProfileSpec:
        for spec in self.specs:
            if spec.name == name:
                return spec
        raise ProfileError(f"Unknown profile '{name}' (known: {', '.join(self.names)}).")

    def activate(self, name: str) -> None:
        """Switch to profile ``name`` (from whichever is active)."""
        spec = self.spec(name)
        self.restore()
        built = self._built.get(name)
        if built is None:
            built = self.engagers[spec.kind](self.adapter, self.importance, spec.intensity)
            if isinstance(built, Swaps):
                self._built[name] = built
        self._switch = built.apply() if isinstance(built, Swaps) else built
        self.active = spec

    def restore(self) -> None:
        """Back to the dense model: the very modules, no hooks."""
        if self._switch is not None:
            self._switch.undo()
            self._switch = None
        self.active = ProfileSpec("none")

    @contextlib.contextmanager
    def using(self, name: str) -> Iterator[ProfileSpec]:
        """Run under profile ``name``; the dense model is back afterwards, also after an error."""
        self.activate(name)
        try:
            yield self.active
        finally:
            self.restore()

    def kv_eviction(self) -> KvEviction | None:
        """The KV-cache policy of the active profile (None: keep the whole cache)."""
        if self.active.kind != "kv_cache":
            return None
        return KvEviction(self.active.intensity, self.sink)
