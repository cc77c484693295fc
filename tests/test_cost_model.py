"""The analytical cost model against hand-computed figures on tiny-llama (hidden 64, 4 heads / 2 KV heads of
16, FFN 160, 4 blocks, vocabulary 258, tied embeddings), before and after slicing."""

from __future__ import annotations

import pytest

from layerwise.cost.analytic import ModelDims, estimate_costs, model_costs, predicted_speedups
from layerwise.models import get_adapter
from layerwise.ops.structured import slice_attention, slice_mlp

BLOCK_WEIGHTS = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160  # q,o + k,v + gate,up,down = 43008
OTHER = 258 * 64 + 4 * 2 * 64 + 64  # embedding (tied head), two norms per block, final norm


def test_dense_costs_match_hand_computation(tiny):
    costs = model_costs(tiny.model, tokens=10, batch=1, generated=3)
    assert costs.parameters == 4 * BLOCK_WEIGHTS + OTHER == sum(p.numel() for p in tiny.model.parameters())
    pairs = 10 * 11 // 2
    prefill = 2 * 10 * 4 * BLOCK_WEIGHTS + 4 * (4 * 4 * 16 * pairs) + 2 * 258 * 64
    decode = 2 * 4 * BLOCK_WEIGHTS + 4 * (4 * 4 * 16 * 10) + 2 * 258 * 64
    assert (costs.prefill_flops, costs.decode_flops_per_token) == (prefill, decode) == (3_529_984, 387_328)
    assert costs.flops == prefill + 3 * decode
    assert costs.weight_bytes == 4 * (4 * BLOCK_WEIGHTS + OTHER)
    assert costs.kv_bytes_per_token == 4 * 2 * 2 * 16 * 4  # blocks x (K and V) x KV heads x head_dim x 4 bytes
    assert costs.kv_bytes == 1024 * (10 + 3)
    # MLP: residual + normed (2 x 64) + gate, up, product (3 x 160) per token; attention: 10 x (128 + 192) + 4 x 10²
    assert costs.peak_activation_bytes == 4 * 10 * (128 + 3 * 160)
    assert model_costs(tiny.model, tokens=128).peak_activation_bytes == 4 * (128 * (128 + 12 * 16) + 4 * 128 * 128)


def test_weight_bits_price_only_decoder_linears(tiny):
    costs = estimate_costs(ModelDims.from_model(tiny.model), tokens=10, generated=0, weight_bits=4)
    assert costs.weight_bytes == 4 * BLOCK_WEIGHTS // 2 + 4 * OTHER


def test_costs_follow_slicing_and_agree_with_the_projection(tiny):
    dense = ModelDims.from_model(tiny.model)
    adapter = get_adapter(tiny.model)
    slice_attention(adapter, 0, [1])  # one of two KV groups: 2 query heads, 1 KV head
    slice_mlp(adapter, 2, list(range(0, 160, 2)))  # 80 channels
    sliced = model_costs(tiny.model, tokens=16, generated=4)
    projected = estimate_costs(dense.with_widths({0: 1}, {2: 80}), tokens=16, generated=4)
    assert sliced == projected
    assert sliced.parameters == sum(p.numel() for p in tiny.model.parameters())
    assert sliced.kv_bytes_per_token == (3 * 2 * 2 * 16 + 2 * 1 * 16) * 4
    assert sliced.parameters == 4 * BLOCK_WEIGHTS + OTHER - (2 * 64 * 32 + 2 * 64 * 16) - 3 * 64 * 80


def test_predicted_speedup_is_the_flop_ratio(tiny):
    dims = ModelDims.from_model(tiny.model)
    dense = estimate_costs(dims)
    half = estimate_costs(dims.with_widths({}, {i: 80 for i in range(4)}))
    speedup = predicted_speedups(dense, half)
    assert speedup["decode"] == pytest.approx(dense.decode_flops_per_token / half.decode_flops_per_token, abs=1e-4)
    assert 1.0 < speedup["decode"] < 2.0
