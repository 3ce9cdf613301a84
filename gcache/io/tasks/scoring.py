"""Scoring: whether a reply answers an item (numbers and option letters here, programs in
the sandbox), the examples shown with a code item, and gold replies for self-tests."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

from gcache.io.tasks import extract, programs
from gcache.io.tasks.contracts import contract
from gcache.io.tasks.datasets import Item, task_family

__all__ = ["Verdict", "score", "score_many", "run_examples", "gold_replies"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    """Scoring outcome: correct, the extracted prediction (None when nothing was found), and
    an error message when the reply could not be scored (sandbox failure, no answer)."""

    correct: bool
    prediction: str | None
    error: str | None = None

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
        answer = contract(item.task)
        if answer.runs_programs:
            code_at.append(i)
            continue
        prediction = answer.prediction(item, reply)
        verdicts[i] = Verdict(answer.correct(item, prediction), prediction, None if prediction is not None else answer.missing)
    if code_at:
        from gcache.io.tasks import sandbox

        try:
            programs.mbpp_expected([items[i] for i in code_at if items[i].task == "mbppplus"], workers)
        except Exception as exc:  # never stop a run over scoring
            log.warning("computing MBPP+ expected outputs failed: %s", exc)
        jobs, limits, where = [], [], []
        for i in code_at:
            program = programs.program_for(items[i], extract.extract_code(replies[i]))
            try:
                job = programs.code_job(items[i], program)
            except Exception as exc:
                verdicts[i] = Verdict(False, program, str(exc))
                continue
            jobs.append(job)
            limits.append(programs.limits_for(items[i], job))
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
    from gcache.io.tasks import sandbox

    if not contract(item.task).runs_programs:
        raise ValueError(f"run_examples: item must be a code task, got {item.task!r}")
    code = programs.program_for(item, extract.extract_code(program))
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
