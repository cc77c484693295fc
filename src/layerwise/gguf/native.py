"""llama.cpp's C libraries as shipped by llama-cpp-python: ggml's per-tensor quantizer and llama.cpp's model
quantizer, reached through ctypes. Imported lazily so that everything else works without llama.cpp."""

from __future__ import annotations

import ctypes
import functools
import pathlib
from types import ModuleType

from ..errors import EngineError

LLAMA_CPP_VERSION = "0.3.36"


@functools.cache
def llama_cpp() -> ModuleType:
    """The ``llama_cpp`` package with its backend initialised once, or a clear error when it is missing."""
    try:
        import llama_cpp as module
    except (ImportError, OSError, RuntimeError) as exc:
        raise EngineError(
            f"llama.cpp is not available ({exc}); it is installed by the Makefile "
            f"(llama-cpp-python=={LLAMA_CPP_VERSION} built from source): run `make test` or `make demo` once."
        ) from None
    quiet_logs(module)
    module.llama_backend_init()
    return module


_LOG_CALLBACK = None


def quiet_logs(module: ModuleType) -> None:
    """Route llama.cpp's log lines to nowhere (errors come back to us as return codes and exceptions)."""
    global _LOG_CALLBACK
    if _LOG_CALLBACK is None:
        _LOG_CALLBACK = module.llama_log_callback(lambda level, text, user_data: None)
        module.llama_log_set(_LOG_CALLBACK, ctypes.c_void_p(0))


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """``libggml-base`` with the signatures of the quantization functions we call."""
    module = llama_cpp()
    from llama_cpp._ctypes_extensions import load_shared_library

    lib = load_shared_library("ggml-base", pathlib.Path(module.__file__).parent / "lib")
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


def system_info() -> str:
    """llama.cpp's one-line description of the CPU features it was built with."""
    return llama_cpp().llama_print_system_info().decode().strip()
