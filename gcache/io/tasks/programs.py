"""Code items as sandbox jobs: the program to run, its limits, and MBPP+'s inputs and
expected outputs (shipped precomputed in gcache/data, else computed in the sandbox)."""

from __future__ import annotations

import functools
import gzip
import logging
import pickle
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from gcache.io.tasks import sandbox_child
from gcache.io.tasks.datasets import Item, data_dir, load_items

__all__ = ["mbpp_inputs", "build_mbpp_expected", "EXPECTED_FILE"]

log = logging.getLogger(__name__)

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


def program_for(item: Item, code: str) -> str:
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


def limits_for(item: Item, job: Mapping[str, Any]):
    from gcache.io.tasks import sandbox

    if item.task == "humaneval":
        return sandbox.Limits(wall_s=20.0, cpu_s=20.0, test_s=10.0)
    # Room for every test to use its own limit, as the canonical solution may, plus the
    # harness's own work (copying inputs, hashing huge outputs) on a loaded machine.
    budget = 30.0 + 2.0 * sum(job["time_limits"])
    return sandbox.Limits(wall_s=budget, cpu_s=budget, test_s=4.0, memory_bytes=4 << 30)


EXPECTED_FILE = "mbppplus_expected.pkl.gz"
# Per process: each MBPP+ task id's (outputs, seconds per test), or why they are unknown.
_EXPECTED: dict[str, tuple[list[Any], list[float]] | str] = {}
_EXPECTED_LIMITS = dict(wall_s=600.0, cpu_s=600.0, test_s=120.0, memory_bytes=4 << 30)


@functools.cache
def _load_shipped_expected() -> None:
    """Read the precomputed MBPP+ expected outputs (built by `build_mbpp_expected`) into
    `_EXPECTED`, once per process."""
    path = data_dir() / EXPECTED_FILE
    if not path.exists():
        log.warning("%s is missing: MBPP+ expected outputs will be computed in the sandbox", path)
        return
    from gcache.io.tasks import sandbox

    with gzip.open(path, "rb") as f:
        table = sandbox.trusted_unpickle(f.read())
    for task_id, value in table.items():
        _EXPECTED.setdefault(task_id, (list(value[0]), list(value[1])))


def _compute_expected(items: Sequence[Item], workers: int | None = None, progress=None) -> dict[str, Any]:
    """Run the items' canonical solutions in the sandbox (trusted code; one child per task):
    task id -> (outputs, seconds per test), or a message saying why the solution failed."""
    from gcache.io.tasks import sandbox

    jobs = [
        {
            "mode": "outputs",
            "program": it.meta["canonical_solution"],
            "entry_point": it.meta["entry_point"],
            "inputs": mbpp_inputs(it),
            "oracle": _MBPP_ORACLES.get(it.meta["entry_point"]),
            "test_s": _EXPECTED_LIMITS["test_s"],
        }
        for it in items
    ]
    results = sandbox.run_many(jobs, sandbox.Limits(**_EXPECTED_LIMITS), workers=workers, progress=progress)
    return {it.id: res.value if res.passed and res.value is not None else f"the canonical solution failed: {res.error}"
            for it, res in zip(items, results)}


def mbpp_expected(items: Sequence[Item], workers: int | None = None, progress=None) -> None:
    """Fill the per-process cache of MBPP+ expected outputs: from the shipped file, else by
    running the canonical solutions in the sandbox."""
    if not items:
        return
    _load_shipped_expected()
    todo = [it for it in items if it.id not in _EXPECTED]
    if todo:
        _EXPECTED.update(_compute_expected(todo, workers, progress))


def build_mbpp_expected(path: str | Path | None = None, *, workers: int | None = None) -> Path:
    """Run every MBPP+ canonical solution in the sandbox and write their outputs and per-test
    seconds to a gzip'd pickle (built-in types only) at `path` (default: the shipped file).
    Raises RuntimeError when a canonical solution fails."""
    from gcache.io.tasks import sandbox

    items = load_items("mbppplus", "train") + load_items("mbppplus", "test")
    table = _compute_expected(items, workers)
    failed = {k: v for k, v in table.items() if isinstance(v, str)}
    if failed:
        raise RuntimeError(f"canonical solutions failed: {failed}")
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


def code_job(item: Item, program: str) -> dict[str, Any]:
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


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["build-mbpp-expected"]:
        logging.basicConfig(level=logging.INFO)
        print(build_mbpp_expected())
    else:
        sys.exit("usage: python -m gcache.io.tasks.programs build-mbpp-expected")
