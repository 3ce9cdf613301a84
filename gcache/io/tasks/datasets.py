"""Benchmark datasets: loaders returning typed items and train/test splits.

Scoring lives in `gcache.io.tasks.scoring`, how code items become sandbox jobs in
`gcache.io.tasks.programs`.

Tasks: gsm8k (math), gpqa (science), medqa (medicine), humaneval and mbppplus (code).
The datasets ship inside the package (gcache/data, provenance in its README.md). routing (scored
as math) has no data file: its questions are generated from the seed (gcache.io.tasks.routing).

Splits. GSM8K: "train" is the official train file (7473 rows), "test" the official test file
(1319 rows). Every other task splits its one file with a seeded permutation of the row
indices (``random.Random(f"gcache-split:{task}:{seed}")``): the first
``round(TRAIN_FRACTION * rows)`` permuted rows are "train", the rest "test"; items of a split
come back in file order. With the default seed 0: humaneval 33/131, mbppplus 80/319,
gpqa 40/158, medqa 60/240 (train/test).

Bad rows. A malformed row (missing field, wrong type, no gold option) never stops a load:
`load_items` skips it with a logged warning naming the task, row and field;
`parse_rows` returns the same items plus the list of `RowError`s for callers that want them.
An unknown task, split, limit or question_id raises ValueError/TypeError.
"""

from __future__ import annotations

import csv
import functools
import gzip
import io
import json
import logging
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gcache.core.checks import check_int
from gcache.io.tasks import extract

__all__ = [
    "TASKS",
    "FAMILIES",
    "TRAIN_FRACTION",
    "Item",
    "RowError",
    "task_family",
    "load_items",
    "parse_rows",
    "data_dir",
]

log = logging.getLogger(__name__)

TASKS = ("gsm8k", "gpqa", "medqa", "humaneval", "mbppplus", "routing")
FAMILIES = {"gsm8k": "math", "gpqa": "science", "medqa": "medicine", "humaneval": "code", "mbppplus": "code",
            "routing": "math"}
TRAIN_FRACTION = 0.2
LETTERS = "ABCD"


@dataclass(frozen=True)
class Item:
    """One benchmark question.

    id: stable identifier ("gsm8k/test/17", "gpqa/rec...", "medqa/4", "HumanEval/3", "Mbpp/2");
    task: one of TASKS; index: row number in the source file; question: the text shown to the
    agents (options included for multiple choice, the specification for code); gold: the
    answer (number as text, letter, or the canonical program); meta: task-specific fields
    (options, entry_point, test, base_input, plus_input, atol, ...).
    """

    id: str
    task: str
    index: int
    question: str
    gold: str
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)



@dataclass(frozen=True)
class RowError:
    """A malformed dataset row: task, row number in the file, the offending field, why."""

    task: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"task {self.task}, row {self.row}, field {self.field!r}: {self.message}"


class _BadRow(Exception):
    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def _check_task(task: str) -> str:
    if not isinstance(task, str):
        raise TypeError(f"task must be a str (one of {', '.join(TASKS)}), got {type(task).__name__}")
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    return task


def task_family(task: str) -> str:
    """"math" | "science" | "medicine" | "code" for a task name; ValueError for an unknown task."""
    return FAMILIES[_check_task(task)]


def data_dir() -> Path:
    """The folder of the shipped datasets."""
    return Path(__file__).resolve().parents[2] / "data"


_FILES = {
    ("gsm8k", "train"): "gsm8k_train.jsonl.gz",
    ("gsm8k", "test"): "gsm8k_test.jsonl.gz",
    ("gpqa", None): "gpqa_diamond.csv.gz",
    ("medqa", None): "medqa.json.gz",
    ("humaneval", None): "HumanEval.jsonl.gz",
    ("mbppplus", None): "MbppPlus.jsonl.gz",
}


@functools.lru_cache(maxsize=None)
def _raw_rows(filename: str) -> tuple[Any, ...]:
    path = data_dir() / filename
    with gzip.open(path, "rt", encoding="utf-8") as f:
        text = f.read()
    if filename.endswith(".jsonl.gz"):
        rows = []
        for number, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(_Unreadable(f"line {number + 1} is not JSON: {exc}"))
        return tuple(rows)
    if filename.endswith(".json.gz"):
        return tuple(json.loads(text))
    return tuple(csv.DictReader(io.StringIO(text)))


@dataclass(frozen=True)
class _Unreadable:
    message: str


def _field(row: Any, name: str, kind: type | tuple[type, ...] = str) -> Any:
    if isinstance(row, _Unreadable):
        raise _BadRow("<row>", row.message)
    if not isinstance(row, Mapping):
        raise _BadRow("<row>", f"expected an object, got {type(row).__name__}")
    if name not in row or row[name] is None:
        raise _BadRow(name, "missing")
    value = row[name]
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise _BadRow(name, f"expected {expected}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise _BadRow(name, "empty")
    return value


def _gsm8k(row: Any, index: int, split: str) -> Item:
    question = _field(row, "question")
    answer = _field(row, "answer")
    if "####" not in answer:
        raise _BadRow("answer", "no '####' before the final answer")
    gold_value = extract.parse_number(answer.rsplit("####", 1)[1])
    if gold_value is None:
        raise _BadRow("answer", "no number after '####'")
    return Item(
        id=f"gsm8k/{split}/{index}",
        task="gsm8k",
        index=index,
        question=question.strip(),
        gold=extract.format_number(gold_value),
        meta={"solution": answer},
    )


def _choice_question(stem: str, options: Sequence[str]) -> str:
    lines = [stem.strip(), ""]
    lines += [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]
    return "\n".join(lines)


def _gpqa(row: Any, index: int, split: str) -> Item:
    question = _field(row, "Question")
    correct = _field(row, "Correct Answer").strip()
    wrong = [_field(row, f"Incorrect Answer {k}").strip() for k in (1, 2, 3)]
    record = row.get("Record ID") or str(index)
    options = [correct] + wrong
    # A per-question seed: the order does not depend on the split seed or on row order.
    random.Random(f"gcache-gpqa:{record}").shuffle(options)
    gold = LETTERS[options.index(correct)]
    return Item(
        id=f"gpqa/{record}",
        task="gpqa",
        index=index,
        question=_choice_question(question, options),
        gold=gold,
        meta={"options": tuple(options), "subdomain": row.get("Subdomain", ""), "record_id": record},
    )


def _medqa(row: Any, index: int, split: str) -> Item:
    question = _field(row, "question")
    raw_options = _field(row, "options", list)
    answer = _field(row, "answer").strip()
    if len(raw_options) != 4 or not all(isinstance(o, str) for o in raw_options):
        raise _BadRow("options", f"expected 4 strings, got {raw_options!r:.80}")
    options = []
    for i, text in enumerate(raw_options):
        m = re.match(r"\s*([A-D])\s*[\.\):]\s*(.*)", text, flags=re.DOTALL)
        if m is None or m.group(1) != LETTERS[i]:
            raise _BadRow("options", f"option {i} should start with '{LETTERS[i]}.', got {text!r:.40}")
        options.append(m.group(2).strip())
    matches = [i for i, text in enumerate(options) if text == answer]
    if len(matches) != 1:
        raise _BadRow("answer", f"matches {len(matches)} options, expected exactly 1")
    # The file's question repeats the options (twice); the stem is what precedes them.
    stem = question
    cut = re.search(r"(?m)^\s*A\.\s", question)
    if cut is not None:
        stem = question[: cut.start()]
    return Item(
        id=f"medqa/{index}",
        task="medqa",
        index=index,
        question=_choice_question(stem, options),
        gold=LETTERS[matches[0]],
        meta={"options": tuple(options)},
    )


def _humaneval(row: Any, index: int, split: str) -> Item:
    task_id = _field(row, "task_id")
    prompt = _field(row, "prompt")
    entry_point = _field(row, "entry_point")
    solution = _field(row, "canonical_solution")
    test = _field(row, "test")
    if "def check(" not in test:
        raise _BadRow("test", "does not define check(candidate)")
    return Item(
        id=task_id,
        task="humaneval",
        index=index,
        question=prompt,
        gold=prompt + solution,
        meta={"entry_point": entry_point, "prompt": prompt, "test": test, "canonical_solution": solution},
    )


def _mbppplus(row: Any, index: int, split: str) -> Item:
    task_id = _field(row, "task_id")
    prompt = _field(row, "prompt")
    entry_point = _field(row, "entry_point")
    solution = _field(row, "canonical_solution")
    # One task of the snapshot stores "no plus inputs" as {} instead of [].
    base_input = _field(row, "base_input", (list, dict)) or []
    plus_input = _field(row, "plus_input", (list, dict)) or []
    for name, value in (("base_input", base_input), ("plus_input", plus_input)):
        if not isinstance(value, list):
            raise _BadRow(name, f"expected list, got {type(value).__name__}")
    atol = _field(row, "atol", (int, float))
    assertion = row.get("assertion") or ""
    if not isinstance(assertion, str):
        raise _BadRow("assertion", f"expected str, got {type(assertion).__name__}")
    for name, inputs in (("base_input", base_input), ("plus_input", plus_input)):
        if not all(isinstance(args, list) for args in inputs):
            raise _BadRow(name, "every test input must be a list of arguments")
    if f"def {entry_point}" not in solution:
        raise _BadRow("canonical_solution", f"does not define {entry_point}")
    spec = prompt.strip().strip("'\"").strip()
    example = next((line for line in assertion.splitlines() if line.strip().startswith("assert")), "")
    question = spec + ("\n" + example.strip() if example else "") + f"\nWrite the Python function `{entry_point}`."
    return Item(
        id=task_id,
        task="mbppplus",
        index=index,
        question=question,
        gold=solution,
        meta={
            "entry_point": entry_point,
            "prompt": prompt,
            "canonical_solution": solution,
            "base_input": base_input,
            "plus_input": plus_input,
            "atol": float(atol),
            "assertion": assertion,
            "example": example.strip(),
        },
    )


_PARSERS = {"gsm8k": _gsm8k, "gpqa": _gpqa, "medqa": _medqa, "humaneval": _humaneval, "mbppplus": _mbppplus}


def parse_rows(task: str, rows: Iterable[Any], *, split: str = "test", indices: Iterable[int] | None = None) -> tuple[list[Item], list[RowError]]:
    """Typed items from raw dataset rows, and a RowError for each malformed row (skipped).

    `indices` gives each row's number in its file (default 0, 1, ...)."""
    _check_task(task)
    parser = _PARSERS[task]
    items: list[Item] = []
    errors: list[RowError] = []
    rows = list(rows)
    numbers = list(indices) if indices is not None else list(range(len(rows)))
    for index, row in zip(numbers, rows):
        try:
            items.append(parser(row, index, split))
        except _BadRow as exc:
            errors.append(RowError(task, index, exc.field, exc.message))
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            errors.append(RowError(task, index, "<row>", f"{type(exc).__name__}: {exc}"))
    return items, errors


def _split_indices(task: str, split: str, n_rows: int, seed: int) -> list[int]:
    if task == "gsm8k":
        return list(range(n_rows))
    order = list(range(n_rows))
    random.Random(f"gcache-split:{task}:{seed}").shuffle(order)
    n_train = round(TRAIN_FRACTION * n_rows)
    chosen = order[:n_train] if split == "train" else order[n_train:]
    return sorted(chosen)


def load_items(
    task: str,
    split: str = "test",
    *,
    limit: int | None = None,
    question_id: int | str | None = None,
    seed: int = 0,
    routing: Any = None,
) -> list[Item]:
    """The items of `task`'s `split` ("train" | "test"), in file order.

    question_id: an int selects the row with that number in the source file (it must belong
    to the split), a str selects the item with that id; limit: keep the first `limit` items.
    routing: the ``gcache.io.tasks.routing.RoutingOptions`` of the routing task (None: its defaults).
    Malformed rows are skipped with a logged warning. Raises ValueError for an unknown task or
    split, a question_id that is out of range or in the other split, or a non-positive limit.
    """
    _check_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None:
        check_int(limit, "limit")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if task == "routing":
        # Imported here: gcache.io.tasks.routing builds Roles (gcache.io.runner.prompts), which import this module.
        from gcache.io.tasks import routing as routing_task

        options = routing_task.RoutingOptions() if routing is None else routing
        return routing_task.load_items(split, limit=limit, question_id=question_id, seed=seed, options=options)
    if routing is not None:
        raise ValueError(f"routing: routing options apply to the routing task, not {task}")
    filename = _FILES[(task, split)] if task == "gsm8k" else _FILES[(task, None)]
    rows = _raw_rows(filename)
    indices = _split_indices(task, split, len(rows), seed)
    if question_id is not None:
        indices = _select(task, split, rows, indices, question_id)
    items, errors = parse_rows(task, [rows[i] for i in indices], split=split, indices=indices)
    for error in errors:
        log.warning("skipping a malformed row: %s", error)
    if question_id is not None and not items:
        raise ValueError(f"task {task}: question_id {question_id!r} selects a malformed row ({errors[0]})")
    if limit is not None:
        items = items[:limit]
    return items


def _select(task: str, split: str, rows: Sequence[Any], indices: list[int], question_id: int | str) -> list[int]:
    if isinstance(question_id, bool) or not isinstance(question_id, (int, str)):
        raise TypeError(f"question_id must be an int (row) or a str (item id), got {type(question_id).__name__}")
    if isinstance(question_id, int):
        if not 0 <= question_id < len(rows):
            raise ValueError(
                f"task {task}: question_id {question_id} is out of range (the file has rows 0..{len(rows) - 1})"
            )
        if question_id not in set(indices):
            raise ValueError(f"task {task}: row {question_id} belongs to the other split, not {split!r}")
        return [question_id]
    items, _ = parse_rows(task, [rows[i] for i in indices], split=split, indices=indices)
    for item in items:
        if item.id == question_id:
            return [item.index]
    raise ValueError(f"task {task}: no item with id {question_id!r} in the {split} split")
