"""Decision rules: who writes text, and how a question's answer is decided.

A rule is chosen once per run (``DECISIONS[name]``) and has three jobs:

- ``speakers(schedule)``: the agent nodes that write text. With latent communication every
  other agent thinks in latent space and passes its cache; with text communication every
  agent writes anyway.
- ``wiring(communication)``: which agents feed the decision node (``"all"`` of the last
  round, or only the ``"sinks"``; see gcache.core.topology).
- ``decide(item, schedule, outputs)``: the agent node whose text is the answer, or None when
  the decision node (the judger) must read its inputs and write it.

Rules:

- ``refer``: nobody speaks early; the judger reads the decision node's inputs and answers.
- ``direct``: the last agent of the execution order writes the answer.
- ``vote``: the agents feeding the decision node write answers; the most frequent extracted
  answer wins (ties: the one given first; its first writer is the answer's node), and when
  none can be extracted the last of them.
- ``code``: the agents feeding the decision node write programs; the first that passes the
  prompt's examples in the sandbox wins, else the judger writes the program. With latent
  communication the decision node reads the sinks, so the agents before them think in
  latent space and only the sinks write candidates.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Mapping, Protocol, Sequence

from gcache.core.graph import DECISION, Node, Schedule
from gcache.io.tasks.contracts import contract
from gcache.io.tasks.datasets import Item
from gcache.io.tasks.scoring import run_examples

log = logging.getLogger(__name__)


class Spoken(Protocol):
    """What a rule reads of an agent node's output."""

    text: str | None


class Decision(Protocol):
    """A decision rule (see the module docstring)."""

    name: str

    def speakers(self, schedule: Schedule) -> frozenset[Node]: ...

    def wiring(self, accumulates: bool, thinks: bool) -> str: ...

    def decide(self, item: Item, schedule: Schedule, outputs: Mapping[Node, Spoken]) -> Node | None: ...


def _wiring(accumulates: bool) -> str:
    """Caches that accumulate along paths (full caches) reach the judger through the sinks only,
    so no agent's content arrives twice; otherwise every agent of the last round feeds it."""
    return "sinks" if accumulates else "all"


def prediction(item: Item, text: str) -> str | None:
    """The answer a reply gives, without running anything (a program is its own prediction)."""
    return contract(item.task).prediction(item, text)


def majority(predictions: Sequence[str | None]) -> int | None:
    """Index of the first prediction of the most frequent non-empty value (None when all are empty)."""
    values = [p for p in predictions if p]
    if not values:
        return None
    winner, _ = Counter(values).most_common(1)[0]
    return predictions.index(winner)


def passes_examples(item: Item, text: str) -> bool:
    """Whether a reply's program passes the prompt's examples; a sandbox failure means it does not."""
    try:
        return bool(run_examples(item, text))
    except Exception as e:  # noqa: BLE001 - any failure to run the examples is a failed candidate
        log.warning("question %s: running the examples failed: %s", item.id, e)
        return False


class Refer:
    name = "refer"

    def speakers(self, schedule: Schedule) -> frozenset[Node]:
        return frozenset()

    def wiring(self, accumulates: bool, thinks: bool) -> str:
        return _wiring(accumulates)

    def decide(self, item: Item, schedule: Schedule, outputs: Mapping[Node, Spoken]) -> Node | None:
        return None


class Direct:
    name = "direct"

    def speakers(self, schedule: Schedule) -> frozenset[Node]:
        return frozenset([schedule.last])

    def wiring(self, accumulates: bool, thinks: bool) -> str:
        return _wiring(accumulates)

    def decide(self, item: Item, schedule: Schedule, outputs: Mapping[Node, Spoken]) -> Node | None:
        return schedule.last


class Vote:
    name = "vote"

    def speakers(self, schedule: Schedule) -> frozenset[Node]:
        return frozenset(schedule.sources(DECISION))

    def wiring(self, accumulates: bool, thinks: bool) -> str:
        return _wiring(accumulates)

    def decide(self, item: Item, schedule: Schedule, outputs: Mapping[Node, Spoken]) -> Node | None:
        voters = schedule.sources(DECISION)
        best = majority([prediction(item, outputs[n].text or "") for n in voters])
        return voters[best if best is not None else -1]


class Code:
    name = "code"

    def speakers(self, schedule: Schedule) -> frozenset[Node]:
        return frozenset(schedule.sources(DECISION))

    def wiring(self, accumulates: bool, thinks: bool) -> str:
        return "sinks" if thinks else _wiring(accumulates)

    def decide(self, item: Item, schedule: Schedule, outputs: Mapping[Node, Spoken]) -> Node | None:
        return next((n for n in schedule.sources(DECISION) if passes_examples(item, outputs[n].text or "")), None)


DECISIONS: dict[str, Decision] = {rule.name: rule for rule in (Refer(), Direct(), Vote(), Code())}
NAMES: tuple[str, ...] = tuple(DECISIONS)

__all__ = ["DECISIONS", "NAMES", "Decision", "majority", "passes_examples", "prediction"]
