"""llama.cpp's rounding of activations, simulated in PyTorch: for its integer dot products llama.cpp first
quantizes each activation row to the weight type's ``vec_dot_type`` (q8_0/q8_1 in blocks of 32 for the legacy
types, q8_K in blocks of 256 for k-quants, f16/bf16 for float weights), so a GGUF file's perplexity in
llama.cpp sits a little above PyTorch's on the same dequantized weights. With this rounding PyTorch computes
what llama.cpp computes (up to summation order)."""

from __future__ import annotations

import torch

# weight type -> the type its activations are rounded to (ggml-cpu's type_traits vec_dot_type)
VEC_DOT_TYPE = {"f32": None, "f16": "f16", "bf16": "bf16", "q8_0": "q8_0", "q5_0": "q8_0", "q4_0": "q8_0",
                "q5_1": "q8_1", "q4_1": "q8_1", "q6_k": "q8_k", "q5_k": "q8_k", "q4_k": "q8_k", "q3_k": "q8_k",
                "q2_k": "q8_k"}


@torch.no_grad()
def round_activations(x: torch.Tensor, weight_type: str) -> torch.Tensor:
    """``x`` [..., in_features] as llama.cpp hands it to a dot product with weights of ``weight_type``."""
    target = VEC_DOT_TYPE[weight_type]
    if target is None:
        return x
    if target in ("f16", "bf16"):
        return x.to(torch.float16 if target == "f16" else torch.bfloat16).to(x.dtype)
    block = 256 if target == "q8_k" else 32
    blocks = x.float().reshape(-1, block)
    if target == "q8_k":  # quantize_row_q8_K_ref: scale from the signed value of largest magnitude, f32 scale
        largest = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        iscale = torch.where(largest != 0, -127.0 / largest, torch.zeros_like(largest))
        codes = torch.round(blocks * iscale).clamp(max=127)
        rounded = torch.where(iscale != 0, codes / iscale, torch.zeros_like(codes))
    else:  # quantize_row_q8_0/q8_1: amax / 127, the scale stored as f16
        scale = blocks.abs().amax(-1, keepdim=True) / 127
        inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
        rounded = torch.round(blocks * inverse) * scale.half().float()
    return rounded.reshape(x.shape).to(x.dtype)
