"""Checking a GGUF file before anything reads its tensors: transformers' and llama.cpp's loaders may fail
deep inside (or abort the process) on a truncated or corrupt file."""

from __future__ import annotations

from pathlib import Path

from gguf import GGUFReader

from ..errors import ModelNotFoundError


def check_gguf_file(path: str | Path) -> Path:
    """``path`` as a readable GGUF file whose tensors all lie inside it, or one clear error: llama.cpp itself
    may abort the process on some malformed files, so they are caught here first."""

    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelNotFoundError(f"GGUF file {file} does not exist.")
    try:
        reader = GGUFReader(file)
        size = file.stat().st_size
        end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    except (ValueError, IndexError, KeyError, OSError, TypeError) as exc:
        raise ModelNotFoundError(f"{file} is not a readable GGUF file: truncated or corrupt "
                                 f"({str(exc).splitlines()[0]}).") from None
    if end > size:
        raise ModelNotFoundError(f"{file} is truncated: its tensors need {end:,} bytes, the file has {size:,}.")
    if "general.architecture" not in reader.fields:
        raise ModelNotFoundError(f"{file} has no general.architecture; it is not a model GGUF.")
    return file
