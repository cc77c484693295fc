"""Library versions and machine facts recorded in every result.json."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

import torch

# instruction sets that decide which kernels llama.cpp and torch run (and so their speed and rounding)
CPU_FEATURES = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_bf16", "amx_int8", "asimd", "sve")
PACKAGES = ("layerwise", "torch", "transformers", "tokenizers", "safetensors", "numpy", "gensim", "pydantic",
            "llama_cpp_python")


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what the platform module knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """Which of ``CPU_FEATURES`` this CPU has (Linux: /proc/cpuinfo's flags; elsewhere none are known)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return []
    flags = {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
             for flag in line.split(":", 1)[1].split()}
    return [name for name in CPU_FEATURES if name in flags]


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def machine(device: str = "cpu") -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_features": cpu_features(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 arithmetic runs natively on ``device``: a CUDA GPU that supports it, or a CPU with
    AVX-512 BF16 or AMX instructions. Elsewhere PyTorch emulates it (on an AVX2-only CPU here a bf16-autocast
    forward pass of SmolLM2 took 3.6-4.9x as long as float32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
