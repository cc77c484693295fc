"""Analytical deployment costs from a model's current shapes: parameters, FLOPs, weight bytes, peak
activation and KV-cache bytes. Pure arithmetic on ``ModelDims``, so a search can price a candidate
width allocation without building it.

Conventions (a multiply-add is 2 FLOPs; attention over a causal prefix of L tokens has L(L+1)/2 pairs):

- prefill of L tokens produces next-token logits for the last position only, as ``generate`` does;
- a decoded token attends to a context of L tokens;
- peak activation is the largest set of tensors alive together in one prefill forward (eager attention):
  at attention, residual + normed input + Q + K + V + probabilities (B·heads·L²) + output; at the MLP,
  residual + normed input + gate + up + their product; at the head, residual + normed + B·V logits.
  The KV cache is counted on its own, not in the peak.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pydantic import BaseModel
from torch import nn

from ..models.adapter import get_adapter


@dataclass(frozen=True)
class LayerDims:
    """One block's widths; a removed sublayer has zero heads (or zero FFN channels)."""

    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    ffn_matrices: int = 3  # gate, up and down (2 for an ungated MLP such as GPT-NeoX's)

    def linear_weights(self, hidden: int) -> int:
        """Parameters of the block's q/k/v/o and MLP weight matrices."""
        attention = hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return attention + self.ffn_matrices * hidden * self.ffn


@dataclass(frozen=True)
class ModelDims:
    """Per-block widths plus what never changes with width: hidden size, vocabulary, other parameters."""

    hidden: int
    vocab: int
    layers: tuple[LayerDims, ...]
    other_parameters: int  # embeddings, norms, biases, an untied output head: everything but block weights
    head_weights: int  # the output projection's weight count (computed per token even when tied)
    dtype_bytes: int = 4

    @classmethod
    def from_model(cls, model: nn.Module) -> "ModelDims":
        """Read every block's current head count, KV heads and FFN width (following slicing and removals)."""
        adapter = get_adapter(model)
        layers = []
        for index in range(adapter.num_blocks):
            attention, mlp = adapter.attention(index), adapter.mlp(index)
            geometry = adapter.head_geometry(index) if not attention.removed else None
            layers.append(LayerDims(
                heads=geometry.num_heads if geometry else 0,
                kv_heads=geometry.num_kv_heads if geometry else 0,
                head_dim=geometry.head_dim if geometry else adapter.head_dim(None),
                ffn=0 if mlp.removed else adapter.ffn_width(index),
                ffn_matrices=3 if mlp.removed else sum(
                    len(slot.segments) for slot in adapter.mlp_layout(index).weight_slots(mlp.module)),
            ))
        hidden = model.config.hidden_size
        total = _unique_parameter_count(model)
        block_weights = sum(layer.linear_weights(hidden) for layer in layers)
        head = model.get_output_embeddings()
        dtype_bytes = next(model.parameters()).element_size()
        return cls(hidden=hidden, vocab=head.out_features, layers=tuple(layers),
                   other_parameters=total - block_weights, head_weights=head.weight.numel(),
                   dtype_bytes=dtype_bytes)

    def with_widths(self, kv_heads: dict[int, int], ffn: dict[int, int]) -> "ModelDims":
        """The same model with block ``i`` keeping ``kv_heads[i]`` KV heads (its query heads follow at the
        block's group size) and ``ffn[i]`` FFN channels; blocks not named keep their widths."""
        layers = list(self.layers)
        for index, kept in kv_heads.items():
            layer = layers[index]
            layers[index] = replace(layer, heads=kept * (layer.heads // layer.kv_heads), kv_heads=kept)
        for index, kept in ffn.items():
            layers[index] = replace(layers[index], ffn=kept)
        return replace(self, layers=tuple(layers))


class CostReport(BaseModel):
    """The five deployment proxies (and parameters) of one model shape in one setting."""

    parameters: int
    prefill_flops: int
    decode_flops_per_token: int
    flops: int  # prefill + every generated token: the setting's compute
    weight_bytes: int
    peak_activation_bytes: int
    kv_bytes_per_token: int
    kv_bytes: int  # at the setting's full length, whole batch
    tokens: int
    batch: int
    generated: int
    weight_bits: float

    def normalised(self, dense: "CostReport") -> dict[str, float]:
        """Each proxy over the dense model's: the reward's cost terms."""
        return {name: getattr(self, name) / max(1, getattr(dense, name)) for name in PROXIES}


PROXIES = ("flops", "weight_bytes", "peak_activation_bytes", "kv_bytes")


def estimate_costs(dims: ModelDims, tokens: int = 128, batch: int = 1, generated: int = 32,
                   weight_bits: float | None = None) -> CostReport:
    """Costs of prefilling ``tokens`` tokens and decoding ``generated`` more, for ``batch`` sequences.

    Decoder weights are stored at ``weight_bits`` (default: the model's dtype); everything else at the dtype.
    """
    bits = weight_bits if weight_bits is not None else 8 * dims.dtype_bytes
    hidden, L, B = dims.hidden, tokens, batch
    block_weights = sum(layer.linear_weights(hidden) for layer in dims.layers)
    pairs = L * (L + 1) // 2
    attention_prefill = sum(4 * layer.heads * layer.head_dim * pairs for layer in dims.layers)
    prefill = B * (2 * L * block_weights + attention_prefill + 2 * dims.head_weights)
    attention_decode = sum(4 * layer.heads * layer.head_dim * L for layer in dims.layers)
    decode = B * (2 * block_weights + attention_decode + 2 * dims.head_weights)
    kv_per_token = sum(2 * layer.kv_heads * layer.head_dim for layer in dims.layers) * dims.dtype_bytes
    return CostReport(
        parameters=dims.other_parameters + block_weights,
        prefill_flops=prefill,
        decode_flops_per_token=decode,
        flops=prefill + generated * decode,
        weight_bytes=int(round(block_weights * bits / 8)) + dims.other_parameters * dims.dtype_bytes,
        peak_activation_bytes=peak_activation_elements(dims, L, B) * dims.dtype_bytes,
        kv_bytes_per_token=kv_per_token,
        kv_bytes=kv_per_token * B * (L + generated),
        tokens=L, batch=B, generated=generated, weight_bits=bits,
    )


def peak_activation_elements(dims: ModelDims, tokens: int, batch: int) -> int:
    """Elements of the largest set of coexisting activations in a prefill forward (see the module doc)."""
    BL, H = batch * tokens, dims.hidden
    candidates = [batch * (2 * H + dims.vocab)]  # residual + normed, and the last position's logits
    for layer in dims.layers:
        if layer.heads:
            qkvo = (2 * layer.heads + 2 * layer.kv_heads) * layer.head_dim
            candidates.append(BL * (2 * H + qkvo) + batch * layer.heads * tokens * tokens)
        if layer.ffn:
            candidates.append(BL * (2 * H + layer.ffn_matrices * layer.ffn))
    return max(candidates)


def model_costs(model: nn.Module, tokens: int = 128, batch: int = 1, generated: int = 32,
                weight_bits: float | None = None) -> CostReport:
    """``estimate_costs`` of the model's current shapes."""
    return estimate_costs(ModelDims.from_model(model), tokens, batch, generated, weight_bits)


def predicted_speedups(dense: CostReport, compressed: CostReport) -> dict[str, float]:
    """FLOP-predicted speedups (dense FLOPs over compressed FLOPs) of prefill, decode and the whole setting."""
    return {
        "prefill": round(dense.prefill_flops / compressed.prefill_flops, 4),
        "decode": round(dense.decode_flops_per_token / compressed.decode_flops_per_token, 4),
        "total": round(dense.flops / compressed.flops, 4),
    }


def _unique_parameter_count(model: nn.Module) -> int:
    seen, total = set(), 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel()
    return total
