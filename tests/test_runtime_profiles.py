"""Reversible runtime profiles on tiny-llama: every profile applies and restores to identical logits, sliced
variants share the dense weights' storage and compute what the masks compute."""

from __future__ import annotations

import pytest
import torch

from layerwise.runtime.profiles import (
    DEFAULT_INTENSITIES,
    Importance,
    KvEviction,
    ProfileError,
    ProfileSet,
    ProfileSpec,
    default_specs,
)


@pytest.fixture
def importance(tiny, calibration):
    return Importance.from_calibration(tiny.model, calibration)


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_default_profiles_cover_every_kind_with_a_lighter_and_a_heavier_level():
    names = [spec.name for spec in default_specs()]
    assert names[0] == "none" and len(names) == 1 + sum(len(v) for v in DEFAULT_INTENSITIES.values())
    seeds = {"kv_cache": 0.3, "attention_heads": 0.4, "ffn_neurons": 0.5, "transformer_layers": 0.3}
    for kind, seed in seeds.items():
        levels = DEFAULT_INTENSITIES[kind]
        assert seed in levels and min(levels) < seed < max(levels)
    assert ProfileSpec.parse("ffn_neurons@0.5") == ProfileSpec("ffn_neurons", 0.5)
    with pytest.raises(ProfileError, match="Unknown profile kind"):
        ProfileSpec.parse("heads@0.5")
    with pytest.raises(ProfileError, match="intensity must lie in"):
        ProfileSpec("ffn_neurons", 1.5)


@pytest.mark.parametrize("mechanism", ["sliced", "mask"])
def test_every_profile_applies_and_restores_to_identical_logits(tiny, tokens, importance, mechanism):
    original = _logits(tiny.model, tokens)
    profiles = ProfileSet(tiny.model, importance, mechanism=mechanism)
    dense = _logits(tiny.model, tokens)
    assert torch.allclose(dense, original, atol=1e-5)  # the importance order is a permutation only
    for name in profiles.names:
        profiles.activate(name)
        pruned = _logits(tiny.model, tokens)
        if profiles.active.kind in ("none", "kv_cache"):  # the cache policy lives in the generator
            assert torch.equal(pruned, dense)
        else:
            assert not torch.allclose(pruned, dense, atol=1e-3), name
        profiles.restore()
        assert torch.equal(_logits(tiny.model, tokens), dense), name
    with pytest.raises(ProfileError, match="Unknown profile"):
        profiles.activate("ffn_neurons@0.33")
    with pytest.raises(RuntimeError):
        with profiles.using("ffn_neurons@0.5"):
            raise RuntimeError("a failing request")
    assert profiles.active.name == "none" and torch.equal(_logits(tiny.model, tokens), dense)


def test_sliced_variants_share_storage_and_match_the_masks(tiny, tokens, importance):
    from layerwise.models import get_adapter

    profiles = ProfileSet(tiny.model, importance, mechanism="sliced")
    adapter = get_adapter(tiny.model)
    dense = {name: p for name, p in tiny.model.named_parameters()}
    storages = {p.untyped_storage().data_ptr() for p in dense.values()}
    for name in ("attention_heads@0.4", "ffn_neurons@0.5"):
        profiles.activate(name)
        sliced = _logits(tiny.model, tokens)
        for parameter in tiny.model.parameters():  # every tensor of the variant is a view of a dense one
            assert parameter.untyped_storage().data_ptr() in storages
        if name.startswith("ffn"):
            assert adapter.ffn_width(0) == 160 // 2  # tiny-llama: FFN width 160
        else:
            kept = importance.kept_groups(0.4)  # 8 KV groups in all, round(4.8) = 5 kept, one at least per block
            assert sum(kept.values()) == 5 and min(kept.values()) >= 1
            assert [adapter.head_geometry(b).num_kv_heads for b in range(4)] == [kept[b] for b in range(4)]
        profiles.restore()
        masked = ProfileSet(tiny.model, importance, mechanism="mask")  # already in order: the permutation is identity
        masked.activate(name)
        assert torch.allclose(_logits(tiny.model, tokens), sliced, atol=1e-5)
        masked.restore()
    assert sum(p.numel() for p in tiny.model.parameters()) == sum(p.numel() for p in dense.values())


def test_heads_are_dropped_by_their_share_of_the_block_not_by_raw_score():
    # block 1's scores are 10x block 0's (deeper blocks see larger activations), but block 0 has the one
    # group that carries little of its block: it goes first, then block 1's weakest share
    importance = Importance(groups={0: [0, 1, 2], 1: [0, 1, 2]}, channels={}, blocks=[],
                            group_scores={0: [5.0, 4.0, 1.0], 1: [40.0, 35.0, 25.0]})
    assert importance.kept_groups(1 / 6) == {0: 2, 1: 3}
    assert importance.kept_groups(2 / 6) == {0: 2, 1: 2}
    assert importance.kept_groups(0.99) == {0: 1, 1: 1}  # every block keeps one


def test_layer_profile_skips_the_most_redundant_blocks(tiny, importance):
    from layerwise.models import get_adapter

    profiles = ProfileSet(tiny.model, importance)
    adapter = get_adapter(tiny.model)
    attentions = [adapter.attention(b).module for b in range(adapter.num_blocks)]
    for _ in range(2):  # the first activation resolves the cached swaps, the second replays them
        profiles.activate("transformer_layers@0.45")  # 4 blocks: round(1.8) = 2 skipped
        removed = [b for b in range(adapter.num_blocks) if not adapter.sublayers(b)]
        assert removed == sorted(importance.blocks[:2])
        kept = [b for b in range(adapter.num_blocks) if b not in removed]
        assert [attentions[b].layer_idx for b in kept] == [0, 1]  # the KV cache's layers are the blocks left
        profiles.activate("ffn_neurons@0.5")  # from another profile: the blocks and their numbers come back
        assert [a.layer_idx for a in attentions] == [0, 1, 2, 3]
        assert not any(s.removed for b in range(adapter.num_blocks) for s in adapter.sublayers(b))
    profiles.restore()
    assert not any(s.removed for b in range(adapter.num_blocks) for s in adapter.sublayers(b))
    assert [a.layer_idx for a in attentions] == [0, 1, 2, 3]


def test_kv_eviction_keeps_the_sink_and_the_recent_window():
    policy = KvEviction(0.3, sink=4)
    assert policy.keep(100) == 70 and policy.keep(5) == 5 and policy.keep(3) == 3


def test_generation_matches_transformers_greedy_and_evicts_the_cache(tiny, tokens):
    from layerwise.runtime.generate import continuation_perplexity, generate

    prompt = tokens[:1]
    ours = generate(tiny.model, prompt, 12)
    with torch.no_grad():
        reference = tiny.model.generate(prompt, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert ours.new_tokens == reference[0, prompt.shape[1]:].tolist()
    assert ours.cache_length == prompt.shape[1] + 11 and ours.tokens_per_s > 0
    evicted = generate(tiny.model, prompt, 12, KvEviction(0.5, sink=4))
    assert evicted.cache_length == KvEviction(0.5, sink=4).keep(prompt.shape[1] + 10) + 1  # evicted, then one step
    assert len(evicted.new_tokens) == 12
    ppl = continuation_perplexity(tiny.model, prompt, ours.new_tokens)
    with torch.no_grad():
        ids = reference
        logits = tiny.model(ids).logits[0, prompt.shape[1] - 1 : -1]
        expected = torch.nn.functional.cross_entropy(logits, ids[0, prompt.shape[1]:]).exp()
    assert ppl == pytest.approx(float(expected), rel=1e-5)
    forced = generate(tiny.model, prompt, 12, forced=ours.new_tokens)  # teacher-forced: the same tokens, scored
    assert forced.new_tokens == ours.new_tokens and forced.perplexity == pytest.approx(ppl, rel=1e-4)
