"""Each task family's answer contract, in one place: the sentence the prompts ask for the final
answer with, the line a decision node's answer starts with, when a reply has finished its
answer, how its answer is read and judged, and the reference line the likelihood measures.

Prompts (``gcache.io.runner.prompts.answer_format``), the decoder's stop rule
(``gcache.io.models.generation.answer_stop``), the answer target
(``gcache.io.runner.answers.answer_target``), scoring (``gcache.io.tasks.scoring``), the
decision rules (``gcache.io.runner.decision``) and the settings check (``--decision code``)
read it here, so a family's format cannot drift between them.

==========  ==============  =====================================  =================================
family      answer line     read from a reply                      judged
==========  ==============  =====================================  =================================
math        ``#### N``      ``extract.extract_number``             numbers equal to the gold
science,    ``Answer: X``   ``extract.extract_choice`` (A-D)       the gold letter
medicine
code        a ``python``    ``extract.extract_code`` (the last     the tests, in the sandbox
            fenced block    fenced block)                          (``runs_programs``)
==========  ==============  =====================================  =================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from gcache.io.tasks import extract
from gcache.io.tasks.datasets import LETTERS, Item, task_family


@dataclass(frozen=True)
class AnswerContract:
    """How one task family's final answer is asked for, written, read and judged."""

    family: str
    prefix: str  # the answer line's start, as a decision node writes it
    runs_programs: bool  # the answer is a program that the sandbox judges
    missing: str  # the score note of a reply in which no answer was found
    _ask: Callable[[str | None], str]
    _done: Callable[[str], bool]
    _read: Callable[[Item, str], str | None]

    def instruction(self, entry_point: str | None = None) -> str:
        """The sentence that tells the model how to write its final answer (code: naming the
        function ``entry_point`` when it is known)."""
        return self._ask(entry_point)

    def complete(self, text: str) -> bool:
        """Whether ``text`` already ends a final answer in this format (a line counts at its
        newline, so a number or a letter is never cut)."""
        return self._done(text)

    def prediction(self, item: Item, reply: str) -> str | None:
        """The answer ``reply`` gives, without running anything (a program is its own)."""
        return self._read(item, reply)

    def correct(self, item: Item, prediction: str | None) -> bool:
        """Whether a prediction read from a reply is the gold answer (not for programs: the
        sandbox judges those)."""
        if self.runs_programs:
            raise ValueError(f"correct: the {self.family} family's answers are judged by running them")
        if prediction is None:
            return False
        return extract.numbers_equal(prediction, item.gold) if self.family == "math" else prediction == item.gold

    def reference(self, item: Item) -> str:
        """The reference answer written after ``prefix``: the gold (a program closes its block)."""
        gold = item.gold.strip() if isinstance(item.gold, str) else ""
        if not gold:
            raise ValueError(f"item.gold: expected a non-empty reference answer for {item.id!r}, got {item.gold!r}")
        return item.gold.rstrip() + "\n```" if self.runs_programs else gold


def _ask_number(entry_point: str | None) -> str:
    # No example number: small models copy a concrete example ('#### 42') as their answer.
    return ("Show your calculation, then finish with one last line of the form '#### <number>', "
            "giving only the number you computed (no units, no words).")  # fmt: skip


def _ask_letter(entry_point: str | None) -> str:
    return "Finish with one last line of the form 'Answer: X', where X is one of the letters A, B, C or D."


def _ask_program(entry_point: str | None) -> str:
    name = f"`{entry_point}`" if entry_point else "the requested function"
    return (f"Write the complete Python function {name} (with any imports it needs) in a single "
            "```python fenced code block. Do not read input, print, or include tests in that block.")  # fmt: skip


def _read_letter(item: Item, reply: str) -> str | None:
    return extract.extract_choice(reply, item.meta.get("options", ()), LETTERS)


_MATH = AnswerContract(
    "math", "#### ", False, "no number in the reply", _ask_number, extract.number_line_complete,
    lambda item, reply: extract.extract_number(reply),
)  # fmt: skip
_CHOICE = dict(runs_programs=False, missing="no option letter in the reply", _ask=_ask_letter,
               _done=extract.choice_line_complete, _read=_read_letter)  # fmt: skip
CONTRACTS = {
    "math": _MATH,
    "science": AnswerContract("science", "Answer: ", **_CHOICE),
    "medicine": AnswerContract("medicine", "Answer: ", **_CHOICE),
    "code": AnswerContract(
        "code", "```python\n", True, "no program in the reply", _ask_program, extract.closed_block_with_def,
        lambda item, reply: extract.extract_code(reply) or None,
    ),  # fmt: skip
}


def family_contract(family: str) -> AnswerContract:
    """The contract of a task family; ValueError naming the families for an unknown one."""
    if family not in CONTRACTS:
        raise ValueError(f"family: expected one of {', '.join(map(repr, CONTRACTS))}, got {family!r}")
    return CONTRACTS[family]


def contract(task: str) -> AnswerContract:
    """The answer contract of a task (by its family); ValueError for an unknown task."""
    return CONTRACTS[task_family(task)]


def answer_complete(family: str, text: str) -> bool:
    """Whether ``text`` already ends a final answer in ``family``'s format (the decoder's stop
    rule). Raises ValueError on an unknown family."""
    return family_contract(family).complete(text)


__all__ = ["CONTRACTS", "AnswerContract", "answer_complete", "contract", "family_contract"]
