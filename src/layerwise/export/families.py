"""How llama.cpp reads each adapted family: its architecture name, the hyperparameter keys its loader wants, and
what its converter (``convert_hf_to_gguf.py``) does to the tensors — row orders, Gemma's ``1 + w`` norms, an
output matrix where the loader requires one. Tensor names come from gguf-py's own ``TensorNameMap``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import gguf
import numpy as np
from gguf import GGUFWriter

from ..errors import ExportError
from ..registry import Registry

# llama.cpp's hyperparameter keys beyond the common ones, written from the Hugging Face config
ExtraKeys = Callable[[GGUFWriter, object], None]
# GGUF tensor kind (attn_q, attn_qkv, ...), its rows, the config, head size -> the row order llama.cpp expects
RowOrder = Callable[[str, int, object, int], Optional[np.ndarray]]


def _no_keys(writer: GGUFWriter, config) -> None:
    pass


def _no_order(kind: str, rows: int, config, head_dim: int) -> Optional[np.ndarray]:
    return None


@dataclass(frozen=True)
class GGUFFamily:
    """One Hugging Face model type as llama.cpp's loader and graph for ``architecture`` expect it."""

    architecture: str
    row_order: RowOrder = _no_order
    norm_shift: float = 0.0  # Gemma stores RMSNorm weights as w and computes with (1 + w); llama.cpp wants 1 + w
    layer_norm: bool = False  # LayerNorm (weight and bias, ``layer_norm_epsilon``) instead of RMSNorm
    needs_output: bool = False  # the loader requires ``output.weight`` even when the head is tied
    per_layer: bool = False  # per-layer widths and removed sublayers expressible (as ``deci``)
    full_query_width: bool = False  # the loader shapes q and o as hidden x hidden: query heads cannot be narrowed
    extra_keys: ExtraKeys = _no_keys
    notes: tuple[str, ...] = field(default_factory=tuple)


def rotary_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that turns Hugging Face's half-split rotary layout into llama.cpp's interleaved one."""
    return np.arange(rows).reshape(heads, 2, rows // heads // 2).swapaxes(1, 2).reshape(-1)


def _llama_rows(kind: str, rows: int, config, head_dim: int) -> Optional[np.ndarray]:
    """llama.cpp's ``llama`` rotates consecutive pairs: q and k rows are permuted as its converter does."""
    return rotary_rows(rows, rows // head_dim) if kind in ("attn_q", "attn_k") else None


def _neox_rows(kind: str, rows: int, config, head_dim: int) -> Optional[np.ndarray]:
    """GPT-NeoX interleaves q, k and v per head; llama.cpp wants all q rows, then k, then v."""
    if kind != "attn_qkv":
        return None
    heads = rows // (3 * head_dim)
    return np.arange(rows).reshape(heads, 3, head_dim).swapaxes(0, 1).reshape(-1)


def _layer_pattern(writer: GGUFWriter, config) -> None:
    """Sliding-window layers as the config lists them (``layer_types``), with the window."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window:
        writer.add_sliding_window(int(window))
        if types:
            writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in types])


def _attention_scale_is_head_dim(config) -> None:
    """llama.cpp's Gemma graphs scale attention by 1/sqrt(head size) (the 27B shapes aside); a config asking for
    another scale would compute something else there."""
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and int(scalar) != int(config.head_dim):
        raise ExportError(f"llama.cpp scales Gemma attention by 1/sqrt(head size {config.head_dim}); this model "
                          f"uses query_pre_attn_scalar {scalar}, which it cannot express.")


def _gemma2_keys(writer: GGUFWriter, config) -> None:
    _attention_scale_is_head_dim(config)
    if getattr(config, "attn_logit_softcapping", None):
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    _layer_pattern(writer, config)


def _gemma3_keys(writer: GGUFWriter, config) -> None:
    _attention_scale_is_head_dim(config)
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    _layer_pattern(writer, config)
    sliding = (getattr(config, "rope_parameters", None) or {}).get("sliding_attention")
    if sliding:
        writer.add_rope_freq_base_swa(float(sliding["rope_theta"]))


def _gpt_neox_keys(writer: GGUFWriter, config) -> None:
    writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))


def _mistral_keys(writer: GGUFWriter, config) -> None:
    pass  # llama.cpp runs Mistral as ``llama``, without a sliding window (as its converter writes it)


GGUF_FAMILIES: Registry[GGUFFamily] = Registry("GGUF family")
GGUF_FAMILIES.add("llama", GGUFFamily("llama", _llama_rows, per_layer=True))
GGUF_FAMILIES.add("mistral", GGUFFamily("llama", _llama_rows, per_layer=True, extra_keys=_mistral_keys, notes=(
    "Mistral runs as llama.cpp's llama architecture, which has no sliding window (as llama.cpp's converter "
    "writes it): contexts longer than the window attend further than the original.",)))
GGUF_FAMILIES.add("qwen2", GGUFFamily("qwen2", full_query_width=True))
GGUF_FAMILIES.add("qwen3", GGUFFamily("qwen3"))
GGUF_FAMILIES.add("olmo2", GGUFFamily("olmo2", needs_output=True, full_query_width=True))
GGUF_FAMILIES.add("gemma", GGUFFamily("gemma", norm_shift=1.0))
GGUF_FAMILIES.add("gemma2", GGUFFamily("gemma2", norm_shift=1.0, extra_keys=_gemma2_keys))
GGUF_FAMILIES.add("gemma3_text", GGUFFamily("gemma3", norm_shift=1.0, extra_keys=_gemma3_keys))
GGUF_FAMILIES.add("phi3", GGUFFamily("phi3", full_query_width=True))
GGUF_FAMILIES.add("gpt_neox", GGUFFamily("gptneox", _neox_rows, layer_norm=True, needs_output=True,
                                         full_query_width=True, extra_keys=_gpt_neox_keys))


def gguf_family(config) -> GGUFFamily:
    """The family ``config`` belongs to as llama.cpp reads it, or an ``ExportError`` naming the model type."""
    model_type = getattr(config, "model_type", None)
    if model_type not in GGUF_FAMILIES:
        raise ExportError(f"GGUF export covers the families {', '.join(GGUF_FAMILIES.names())}; this model is "
                          f"'{model_type}'.")
    return GGUF_FAMILIES.get(model_type)


def tensor_name_map(family: GGUFFamily, blocks: int):
    """gguf-py's map from Hugging Face module names to the tensor names llama.cpp loads for ``family``."""

    arch = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == family.architecture)
    return gguf.TensorNameMap(arch, blocks)


def rope_dimensions(config, head_dim: int) -> int:
    """How many of a head's dimensions are rotated (GPT-NeoX and Phi rotate a fraction)."""
    parameters = getattr(config, "rope_parameters", None) or {}
    fraction = parameters.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)
                              or getattr(config, "rotary_pct", None) or 1.0)
    return int(math.floor(head_dim * float(fraction)))
