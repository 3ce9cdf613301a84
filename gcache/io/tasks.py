"""Benchmark tasks: loaders returning typed items, train/test splits, and scoring.

Tasks: gsm8k (math), gpqa (science), medqa (medicine), humaneval and mbppplus (code).
The datasets ship inside the package (gcache/data, provenance in its README.md). routing (scored
as math) has no data file: its questions are generated from the seed (gcache.io.routing).

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
import pickle
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from gcache.io import extract, sandbox_child

__all__ = [
    "TASKS",
    "FAMILIES",
    "TRAIN_FRACTION",
    "Item",
    "Verdict",
    "RowError",
    "task_family",
    "load_items",
    "parse_rows",
    "score",
    "score_many",
    "run_examples",
    "mbpp_inputs",
    "data_dir",
    "build_mbpp_expected",
    "gold_replies",
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
class Verdict:
    """Scoring outcome: correct, the extracted prediction (None when nothing was found), and
    an error message when the reply could not be scored (sandbox failure, no answer)."""

    correct: bool
    prediction: str | None
    error: str | None = None


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
    return Path(__file__).resolve().parent.parent / "data"


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
    routing: the ``gcache.io.routing.RoutingOptions`` of the routing task (None: its defaults).
    Malformed rows are skipped with a logged warning. Raises ValueError for an unknown task or
    split, a question_id that is out of range or in the other split, or a non-positive limit.
    """
    _check_task(task)
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    if not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if task == "routing":
        # Imported here: gcache.io.routing builds Roles (gcache.io.prompts), which import this module.
        from gcache.io import routing as routing_task

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


# --- scoring --------------------------------------------------------------------------------

# EvalPlus restores Python types that JSON cannot carry (tuples, sets, complex numbers) for
# these MBPP+ tasks before calling the function; the groups follow the task's signature.
_MBPP_TUPLE_ARGS = {2, 116, 132, 143, 222, 261, 273, 394, 399, 421, 424, 429, 470, 560, 579, 596, 616, 630, 726, 740, 744, 809}
_MBPP_TUPLES_IN_LISTS = {63, 64, 70, 94, 120, 237, 272, 299, 400, 409, 417, 438, 473, 614, 780}
_MBPP_FIRST_ARG_TUPLES = {75, 413, 444, 753}
_MBPP_SECOND_ARG_TUPLE = {106, 750}
_MBPP_FIRST_ARG_TUPLE = {250, 405, 446, 617, 720, 763, 808}
_MBPP_NESTED_TUPLES = {259, 401, 445}
_MBPP_ALL_TUPLES = {580, 615, 791}
# Tasks whose expected output is only "is it None" (regex matches) or a special rule.
# Tasks whose order of results is not specified compare as sets.
_MBPP_ORACLES = {"check_str": "not_none", "text_match_three": "not_none", "text_starta_endb": "not_none",
                 "are_equivalent": "always", "sum_div": "zero_ok",
                 **{name: "set_eq" for name in ("similar_elements", "find_char_long", "common_in_nested_lists",
                                                "extract_singly", "larg_nnum", "intersection_array",
                                                "find_dissimilar", "Diff")}}


def _deep_tuple(value: Any) -> Any:
    return tuple(_deep_tuple(v) for v in value) if isinstance(value, list) else value


def mbpp_inputs(item: Item, which: str = "all") -> list[list[Any]]:
    """The argument lists of an MBPP+ item ("base", "plus" or "all"), with the Python types
    EvalPlus restores for tasks whose arguments are tuples, sets or complex numbers."""
    if item.task != "mbppplus":
        raise ValueError(f"mbpp_inputs: item must be an mbppplus item, got task {item.task!r}")
    if which not in ("base", "plus", "all"):
        raise ValueError(f"mbpp_inputs: which must be base|plus|all, got {which!r}")
    raw = []
    if which in ("base", "all"):
        raw += list(item.meta["base_input"])
    if which in ("plus", "all"):
        raw += list(item.meta["plus_input"])
    number = int(item.id.rsplit("/", 1)[-1])
    if number in _MBPP_TUPLE_ARGS:
        return [[tuple(a) for a in args] for args in raw]
    if number in _MBPP_TUPLES_IN_LISTS:
        return [[[tuple(x) for x in a] for a in args] for args in raw]
    if number in _MBPP_FIRST_ARG_TUPLES:
        return [[[tuple(x) for x in args[0]]] + list(args[1:]) for args in raw]
    if number in _MBPP_SECOND_ARG_TUPLE:
        return [[args[0], tuple(args[1])] + list(args[2:]) for args in raw]
    if number == 115:
        return [[[set(x) if isinstance(x, list) and x else {} for x in args[0]]] for args in raw]
    if number == 124:
        return [[float(args[0]), complex(args[1])] for args in raw]
    if number in _MBPP_FIRST_ARG_TUPLE:
        return [[tuple(args[0])] + list(args[1:]) for args in raw]
    if number in _MBPP_NESTED_TUPLES:
        return [[tuple(tuple(x) for x in a) for a in args] for args in raw]
    if number == 278:
        return [[tuple(tuple(x) if isinstance(x, list) else x for x in args[0])] for args in raw]
    if number == 307:
        return [[tuple(args[0]), args[1], args[2]] for args in raw]
    if number == 722:
        return [[{k: tuple(v) for k, v in args[0].items()}] + list(args[1:]) for args in raw]
    if number == 252:
        return [[complex(args[0])] for args in raw]
    if number in _MBPP_ALL_TUPLES:
        return [list(_deep_tuple(args)) for args in raw]
    return [list(args) for args in raw]


def _program_for(item: Item, code: str) -> str:
    """The program to run: for HumanEval, the prompt's imports and helper functions come
    first (tests may call helpers such as encode_cyclic), then the candidate's code; a reply
    holding only the function body is completed with the prompt's signature."""
    if item.task != "humaneval":
        return code
    prompt = item.meta["prompt"]
    entry_point = item.meta["entry_point"]
    if re.search(rf"(?m)^\s*def\s+{re.escape(entry_point)}\s*\(", code):
        head = re.split(rf"(?m)^def\s+{re.escape(entry_point)}\s*\(", prompt, maxsplit=1)[0]
        return head + "\n" + code
    return prompt + code


def _limits_for(item: Item, job: Mapping[str, Any]):
    from gcache.io import sandbox

    if item.task == "humaneval":
        return sandbox.Limits(wall_s=20.0, cpu_s=20.0, test_s=10.0)
    # Room for every test to use its own limit, as the canonical solution may, plus the
    # harness's own work (copying inputs, hashing huge outputs) on a loaded machine.
    budget = 30.0 + 2.0 * sum(job["time_limits"])
    return sandbox.Limits(wall_s=budget, cpu_s=budget, test_s=4.0, memory_bytes=4 << 30)


EXPECTED_FILE = "mbppplus_expected.pkl.gz"
_EXPECTED: dict[str, tuple[list[Any], list[float]] | str] = {}
_EXPECTED_LIMITS = dict(wall_s=600.0, cpu_s=600.0, test_s=120.0, memory_bytes=4 << 30)


def _load_shipped_expected() -> None:
    """Read the precomputed MBPP+ expected outputs (built by `build_mbpp_expected`) once."""
    if _EXPECTED.get("__loaded__") is not None:
        return
    _EXPECTED["__loaded__"] = "yes"
    path = data_dir() / EXPECTED_FILE
    if not path.exists():
        log.warning("%s is missing: MBPP+ expected outputs will be computed in the sandbox", path)
        return
    from gcache.io import sandbox

    with gzip.open(path, "rb") as f:
        table = sandbox.trusted_unpickle(f.read())
    for task_id, value in table.items():
        _EXPECTED.setdefault(task_id, (list(value[0]), list(value[1])))


def _mbpp_expected(items: Sequence[Item], workers: int | None = None, progress=None) -> None:
    """Fill the per-process cache of MBPP+ expected outputs: from the shipped file, else by
    running the canonical solutions in the sandbox (trusted code; one child per task)."""
    from gcache.io import sandbox

    if not items:
        return
    _load_shipped_expected()
    todo = [it for it in items if it.id not in _EXPECTED]
    if not todo:
        return
    jobs = [
        {
            "mode": "outputs",
            "program": it.meta["canonical_solution"],
            "entry_point": it.meta["entry_point"],
            "inputs": mbpp_inputs(it),
            "oracle": _MBPP_ORACLES.get(it.meta["entry_point"]),
            "test_s": _EXPECTED_LIMITS["test_s"],
        }
        for it in todo
    ]
    results = sandbox.run_many(jobs, sandbox.Limits(**_EXPECTED_LIMITS), workers=workers, progress=progress)
    for it, res in zip(todo, results):
        if res.passed and res.value is not None:
            _EXPECTED[it.id] = res.value
        else:
            _EXPECTED[it.id] = f"the canonical solution failed: {res.error}"


def build_mbpp_expected(path: str | Path | None = None, *, workers: int | None = None) -> Path:
    """Run every MBPP+ canonical solution in the sandbox and write their outputs and per-test
    seconds to a gzip'd pickle (built-in types only) at `path` (default: the shipped file).
    Raises RuntimeError when a canonical solution fails."""
    from gcache.io import sandbox

    items = load_items("mbppplus", "train") + load_items("mbppplus", "test")
    _EXPECTED.clear()
    _EXPECTED["__loaded__"] = "skip"
    _mbpp_expected(items, workers)
    failed = {k: v for k, v in _EXPECTED.items() if isinstance(v, str) and k != "__loaded__"}
    if failed:
        raise RuntimeError(f"canonical solutions failed: {failed}")
    table = {it.id: _EXPECTED[it.id] for it in items}
    target = Path(path) if path is not None else data_dir() / EXPECTED_FILE
    data = pickle.dumps(table, protocol=4)
    sandbox.trusted_unpickle(data)  # the file must load under the restricted unpickler
    with gzip.open(target, "wb", compresslevel=9) as f:
        f.write(data)
    return target


class _Digested(tuple):
    """(outputs, times) whose huge exactly-compared outputs are digests already."""


def _digest_huge(outputs: list[Any]) -> list[Any]:
    """Huge expected outputs that EvalPlus compares exactly (anything but floats and flat
    lists of floats) as digests: the child then sends a digest, not ~100 MB of values."""
    out = []
    for value in outputs:
        if isinstance(value, (list, tuple, dict)) and len(value) > 10000 and not _float_list(value):
            if len(repr(value)) > sandbox_child.DIGEST_OVER:
                value = sandbox_child.digest(value)
        out.append(value)
    return out


def _float_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(type(x) is float for x in value)


def _code_job(item: Item, program: str) -> dict[str, Any]:
    if item.task == "humaneval":
        # The dataset's check runs in the trusted process; the prompt's helpers (poly,
        # encode_cyclic, ...) that it calls are dataset code and run there too.
        return {"mode": "check", "program": program, "test": item.meta["test"], "prelude": item.meta["prompt"],
                "entry_point": item.meta["entry_point"], "test_s": 10.0}
    expected = _EXPECTED[item.id]
    if isinstance(expected, str):
        raise RuntimeError(expected)
    outputs, times = expected
    if not isinstance(expected, _Digested):
        outputs = _digest_huge(outputs)
        _EXPECTED[item.id] = _Digested((outputs, times))
    oracle = _MBPP_ORACLES.get(item.meta["entry_point"])
    # EvalPlus-style per-test limits: a multiple of the canonical time, at least one second.
    time_limits = [max(1.0, 4.0 * t) for t in times]
    return {"mode": "compare", "program": program, "entry_point": item.meta["entry_point"],
            "inputs": mbpp_inputs(item), "expected": outputs, "time_limits": time_limits,
            "atol": item.meta["atol"], "oracle": oracle}


def score(item: Item, reply: str) -> Verdict:
    """Whether `reply` answers `item` correctly. Code replies run in the sandbox; a sandbox
    problem becomes Verdict(correct=False, error=...), never an exception."""
    return score_many([item], [reply])[0]


def score_many(items: Sequence[Item], replies: Sequence[str], *, workers: int | None = None, progress=None) -> list[Verdict]:
    """`score` over pairs; code items run one sandboxed child per program, `workers` at a time
    (default: CPU count), and their tests are decided in this process on the plain values
    the child returns. Raises ValueError when the two sequences differ in length."""
    if len(items) != len(replies):
        raise ValueError(f"score_many: {len(items)} items but {len(replies)} replies")
    verdicts: list[Verdict | None] = [None] * len(items)
    code_at: list[int] = []
    for i, (item, reply) in enumerate(zip(items, replies)):
        if not isinstance(reply, str):
            verdicts[i] = Verdict(False, None, f"reply must be a str, got {type(reply).__name__}")
            continue
        family = task_family(item.task)
        if family == "math":
            prediction = extract.extract_number(reply)
            verdicts[i] = Verdict(extract.numbers_equal(prediction, item.gold), prediction,
                                  None if prediction is not None else "no number in the reply")
        elif family in ("science", "medicine"):
            prediction = extract.extract_choice(reply, item.meta.get("options", ()), LETTERS)
            verdicts[i] = Verdict(prediction == item.gold, prediction,
                                  None if prediction is not None else "no option letter in the reply")
        else:
            code_at.append(i)
    if code_at:
        from gcache.io import sandbox

        try:
            _mbpp_expected([items[i] for i in code_at if items[i].task == "mbppplus"], workers)
        except Exception as exc:  # never stop a run over scoring
            log.warning("computing MBPP+ expected outputs failed: %s", exc)
        jobs, limits, where = [], [], []
        for i in code_at:
            program = _program_for(items[i], extract.extract_code(replies[i]))
            try:
                job = _code_job(items[i], program)
            except Exception as exc:
                verdicts[i] = Verdict(False, program, str(exc))
                continue
            jobs.append(job)
            limits.append(_limits_for(items[i], job))
            where.append((i, program))
        results = sandbox.run_many(jobs, limits, workers=workers, progress=progress)
        for (i, program), res in zip(where, results):
            verdicts[i] = Verdict(res.passed, program, res.error)
    return [v if v is not None else Verdict(False, None, "not scored") for v in verdicts]


def run_examples(item: Item, program: str) -> bool:
    """Whether `program` (plain code, or a reply with a fenced block) passes the examples
    shown in the item's question: the ``>>>`` examples of a HumanEval docstring, the
    assertion shown with an MBPP+ task. A program with no runnable example passes when it
    defines the entry point. The program runs in the sandbox, the examples here (with calls
    forwarded to it); never raises for a bad program."""
    from gcache.io import sandbox

    if task_family(item.task) != "code":
        raise ValueError(f"run_examples: item must be a code task, got {item.task!r}")
    code = _program_for(item, extract.extract_code(program))
    entry_point = item.meta["entry_point"]
    asserts: list[str] = []
    if item.task == "mbppplus":
        if item.meta.get("example"):
            asserts.append(item.meta["example"])
    else:
        asserts += _doctest_asserts(item.meta["prompt"])
    if not asserts:
        asserts = [f"{entry_point}  # loaded: the program defines it"]
    job = {"mode": "asserts", "program": code, "entry_point": entry_point, "asserts": asserts, "test_s": 4.0,
           "prelude": item.meta["prompt"] if item.task == "humaneval" else ""}
    res = sandbox.run_tests(job, sandbox.Limits(wall_s=20.0, cpu_s=20.0))
    return res.passed


def _doctest_asserts(prompt: str) -> list[str]:
    """`assert (expr) == (expected)` for every ``>>> expr`` followed by a one-line result."""
    lines = prompt.splitlines()
    out = []
    for i, line in enumerate(lines[:-1]):
        stripped = line.strip()
        if stripped.startswith(">>> "):
            expected = lines[i + 1].strip()
            if expected and not expected.startswith(">>>") and not expected.startswith('"""'):
                expr = stripped[4:]
                candidate = f"assert ({expr}) == ({expected})"
                try:
                    compile(candidate, "<example>", "exec")
                except SyntaxError:
                    continue
                out.append(candidate)
    return out


def gold_replies(item: Item) -> list[str]:
    """Replies that state the gold answer, for self-tests: five common answer styles for math
    and multiple choice, the canonical program in a fenced block for code."""
    family = task_family(item.task)
    if family == "code":
        return [f"Here is the solution.\n\n```python\n{item.gold}\n```\n"]
    if family == "math":
        value = extract.parse_number(item.gold)
        if value is None:
            raise ValueError(f"task {item.task}, item {item.id}: gold {item.gold!r} is not a number")
        plain = extract.format_number(value)
        if value.denominator == 1:
            commas = f"{value.numerator:,}"
            zeros = f"{value.numerator}.00"
        else:
            commas = zeros = plain
        return [
            f"We add up the parts step by step.\n#### {commas}",
            f"Putting it together, the answer is {commas}.",
            f"So the result is $\\boxed{{{plain}}}$.",
            f"First 2 + 3 = 5 is not it. After all steps, the total comes to {zeros} units.",
            f"**Final answer:** {plain}",
        ]
    letter = item.gold
    text = item.meta["options"]["ABCD".index(letter)]
    return [
        f"After comparing the options, ({letter}) is correct.",
        f"{letter}. {text}",
        f"Reasoning about each option in turn.\nAnswer: {letter}",
        f"The best option is $\\boxed{{{letter}}}$.",
        f"The correct response is {text}",
    ]


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["build-mbpp-expected"]:
        logging.basicConfig(level=logging.INFO)
        print(build_mbpp_expected())
    else:
        sys.exit("usage: python -m gcache.io.tasks build-mbpp-expected")
