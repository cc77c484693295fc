"""Model loading, adapters (one file per family) and saving."""

from . import gemma, gpt_neox, llama, olmo2, phi3  # noqa: F401  (register the family adapters)
from .adapter import ADAPTERS, HeadGeometry, ModelAdapter, Sublayer, get_adapter
from .discovery import decoder_linears, find_blocks
from .fingerprint import model_fingerprint
from .loading import NAMED_MODELS, LoadedModel, load, resolve_dtype
from .saving import save

__all__ = [
    "ADAPTERS",
    "HeadGeometry",
    "LoadedModel",
    "ModelAdapter",
    "NAMED_MODELS",
    "Sublayer",
    "decoder_linears",
    "find_blocks",
    "get_adapter",
    "load",
    "model_fingerprint",
    "resolve_dtype",
    "save",
]
