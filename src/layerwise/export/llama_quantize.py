"""llama.cpp's own model quantizer (``llama_model_quantize``, what ``llama-quantize`` runs) through
llama-cpp-python's C bindings: its built-in recipes (Q4_K_M and friends are themselves hand-written per-layer
allocations), per-tensor type overrides, and an importance matrix from layerwise's calibration profile."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np

from ..cache import atomic_path
from ..errors import EngineError, ExportError
from ..gguf import gguf_type
from ..gguf.native import llama_cpp

# llama_ftype values of the recipes compared against (include/llama.h)
RECIPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q8_0": 7, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18}


def llama_quantize(source: str | Path, out: str | Path, recipe: str = "Q4_K_M",
                   imatrix: dict[str, np.ndarray] | None = None, overrides: dict[str, str] | None = None,
                   threads: int | None = None) -> Path:
    """Quantize the GGUF file ``source`` (f32/f16) into ``out`` with llama.cpp's ``recipe``; ``imatrix`` maps GGUF
    tensor names to per-column importances, ``overrides`` GGUF tensor names to types (exact names)."""
    module = llama_cpp()
    if recipe.upper() not in RECIPES:
        raise ExportError(f"Unknown llama.cpp recipe '{recipe}'; choose one of {', '.join(RECIPES)}.")
    params = module.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count() or 1
    params.ftype = RECIPES[recipe.upper()]
    keep: list = []  # ctypes buffers that must outlive the call
    if imatrix:
        entries = (module.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(data)
            entry.name = name.encode()
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = data.size
        params.imatrix = entries
        keep.append(entries)
    if overrides:
        rules = (module.llama_model_tensor_override * (len(overrides) + 1))()
        for rule, (name, kind) in zip(rules, overrides.items()):
            rule.pattern = ("^" + name.replace(".", r"\.") + "$").encode()
            rule.type = int(gguf_type(kind).ggml)
        params.tt_overrides = rules
        keep.append(rules)
    out = Path(out)
    with atomic_path(out) as tmp:
        status = module.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0:
            raise EngineError(f"llama.cpp's quantizer failed on {source} (recipe {recipe}, status {status}).")
    return out
