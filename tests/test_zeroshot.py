"""Zero-shot scoring through lm-eval on tiny-llama: real numbers in range, checked against a direct count."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layerwise.data.zeroshot_tasks import load_items
from layerwise.evaluate.zeroshot import cached_zeroshot, subsample, zeroshot


@pytest.fixture(scope="module")
def scored():
    from layerwise.models.tiny import tiny_llama

    model, tokenizer = tiny_llama()
    return model, tokenizer, zeroshot(model, tokenizer, "arc_easy,winogrande", limit=8, seed=0)


def test_two_tasks_give_accuracies_in_range_with_standard_errors(scored):
    _, _, result = scored
    assert list(result.scores) == ["arc_easy", "winogrande"]
    for score in result.scores.values():
        assert score.items == 8 and 0.0 <= score.acc <= 1.0
        # lm-eval's closed-form standard error of a mean of 0/1 values: sqrt(p(1-p)/(n-1))
        assert score.acc_stderr == pytest.approx(math.sqrt(score.acc * (1 - score.acc) / 7))
    assert result.scores["arc_easy"].acc_norm is not None and result.scores["winogrande"].acc_norm is None
    assert result.scores["arc_easy"].chance == 0.25 and result.protocol.limit == 8


def _loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    context_ids = tokenizer(context, add_special_tokens=False).input_ids
    target_ids = tokenizer(continuation, add_special_tokens=False).input_ids
    ids = torch.tensor([context_ids + target_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(context_ids) - 1 : -1]
    return -F.cross_entropy(logits.float(), torch.tensor(target_ids), reduction="sum").item()


def test_lm_eval_scores_equal_a_direct_loglikelihood_count(scored):
    model, tokenizer, result = scored
    items = load_items("arc_easy")
    correct = correct_norm = 0
    for index in subsample("arc_easy", 8, 0):
        item = items[index]
        lls = [_loglikelihood(model, tokenizer, item["query"], " " + c) for c in item["choices"]]
        normed = [ll / len(c) for ll, c in zip(lls, item["choices"])]
        correct += max(range(len(lls)), key=lls.__getitem__) == item["gold"]
        correct_norm += max(range(len(normed)), key=normed.__getitem__) == item["gold"]
    assert result.scores["arc_easy"].acc == correct / 8
    assert result.scores["arc_easy"].acc_norm == correct_norm / 8


def test_subsampling_is_seeded_and_spans_the_set():
    first = subsample("hellaswag", 50, seed=0)
    assert first == subsample("hellaswag", 50, seed=0) and first != subsample("hellaswag", 50, seed=1)
    assert len(set(first)) == 50 and first == sorted(first) and max(first) > 1000
    assert subsample("arc_challenge", 10_000, seed=0) == list(range(299))


def test_cached_scores_are_reused(scored):
    model, tokenizer, _ = scored
    first, was_cached = cached_zeroshot(model, tokenizer, "lambada", limit=4)
    again, was_cached_again = cached_zeroshot(model, tokenizer, "lambada", limit=4)
    assert not was_cached and was_cached_again and again.scores == first.scores
    assert 0.0 <= first.scores["lambada"].acc <= 1.0 and first.scores["lambada"].chance is None
