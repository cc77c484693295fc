"""GGUF tensor types as quantization levels: block geometry, storage size, and llama.cpp's own fallback when
a tensor's row length is not a multiple of the type's block (k-quants need rows of 256: on a 576-wide model
every projection but ``ffn_down`` falls back, exactly as ``llama-quantize`` would do)."""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..errors import BudgetError


@dataclass(frozen=True)
class GGUFType:
    """One GGUF storage type: its ggml enum, ``block`` weights per ``block_bytes`` bytes."""

    name: str
    ggml: GGMLQuantizationType
    block: int
    block_bytes: int
    legacy: bool  # q4_0 .. q8_0: gguf's numpy quantizer is the reference one

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.block_bytes / self.block

    @property
    def quantized(self) -> bool:
        return self.ggml not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)

    def fits(self, row_length: int) -> bool:
        return row_length % self.block == 0

    def nbytes(self, rows: int, row_length: int) -> int:
        return rows * (row_length // self.block) * self.block_bytes


def _type(name: str, legacy: bool = False) -> GGUFType:
    ggml = GGMLQuantizationType[name.upper()]
    block, block_bytes = GGML_QUANT_SIZES[ggml]
    return GGUFType(name, ggml, block, block_bytes, legacy)


GGUF_TYPES: dict[str, GGUFType] = {t.name: t for t in [
    _type("f32"), _type("f16"), _type("bf16"),
    _type("q8_0", True), _type("q5_1", True), _type("q5_0", True), _type("q4_1", True), _type("q4_0", True),
    _type("q6_k"), _type("q5_k"), _type("q4_k"), _type("q3_k"), _type("q2_k"),
]}
# llama.cpp's tensor_type_fallback (src/llama-quant.cpp): a k-quant whose 256-block does not divide the row
# becomes this 32-block type, and any type that still does not fit becomes f16.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}


def gguf_type(name: str) -> GGUFType:
    """The GGUF type called ``name`` (case-insensitive), or a ``BudgetError`` listing the known ones."""
    key = name.strip().lower()
    if key not in GGUF_TYPES:
        raise BudgetError(f"Unknown GGUF type '{name}'; choose from {', '.join(GGUF_TYPES)}.")
    return GGUF_TYPES[key]


def is_gguf_type(name: object) -> bool:
    return isinstance(name, str) and name.strip().lower() in GGUF_TYPES


def stored_type(name: str, row_length: int) -> GGUFType:
    """The type llama.cpp really stores for a tensor with rows of ``row_length`` asked to be ``name``."""
    chosen = gguf_type(name)
    if chosen.fits(row_length):
        return chosen
    fallback = GGUF_TYPES.get(FALLBACK.get(chosen.name, ""), None)
    if fallback is not None and fallback.fits(row_length):
        return fallback
    return GGUF_TYPES["f16"]


def type_of(ggml: GGMLQuantizationType | int) -> GGUFType:
    """Our entry for a ggml type enum read from a file."""
    for entry in GGUF_TYPES.values():
        if int(entry.ggml) == int(ggml):
            return entry
    raise BudgetError(f"GGUF type {GGMLQuantizationType(int(ggml)).name} is not supported here.")
