"""``save``: safetensors + config + tokenizer + plan.json + layerwise.json, reloadable by ``load``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ..cache import atomic_write_json
from ..version import __version__
from .loading import LAYERWISE_META, LoadedModel, drop_quantization_config

if TYPE_CHECKING:
    from ..plan import Plan

FORMAT = "layerwise.model/1"


def save(loaded: LoadedModel, out_dir: str | Path, plan: "Plan | None" = None) -> Path:
    """Write the model so that ``layerwise.load`` (and plain transformers, where shapes allow) reloads it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    drop_quantization_config(loaded.model)
    loaded.model.save_pretrained(out, safe_serialization=True)
    loaded.tokenizer.save_pretrained(out)
    if plan is not None:
        (out / "plan.json").write_text(plan.to_json())
    meta = {"format": FORMAT, "source": loaded.spec, "layerwise_version": __version__, "has_plan": plan is not None}
    atomic_write_json(out / LAYERWISE_META, meta)
    return out

