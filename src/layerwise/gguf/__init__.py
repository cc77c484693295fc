"""GGUF: llama.cpp's file format and quantization types, with its real quantizers."""

from .types import GGUF_TYPES, GGUFType, gguf_type, is_gguf_type, stored_type, type_of

__all__ = ["GGUF_TYPES", "GGUFType", "gguf_type", "is_gguf_type", "stored_type", "type_of"]
