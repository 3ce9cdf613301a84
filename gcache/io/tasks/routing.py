"""The ``routing`` task family: questions whose answer only one agent knows, generated from a seed.

Each question is its own small world of ``num_agents`` agents (K, default 4). In the ``topics``
variant every agent keeps one topic (its role and profile name it, e.g. "Coins Keeper"), and its
instruction holds that topic's number in this world ("... how many coins there are, the answer is
57."). The question asks for one topic's number ("How many coins are there?"); the topic, the
numbers and the keepers' slots are drawn per question, so which agent is informed depends on the
question. The gold answer is that number, scored like GSM8K (the task's family is ``math``).

Variants (``VARIANTS``, ``--routing-variant``):

- ``topics``: the above; the distractors are the other keepers' numbers.
- ``unreliable``: one of the K agents is a "Rumor Monger" whose role says it is unreliable and
  which claims the asked topic with a wrong number; its slot (never the informed one) is drawn per
  question. The distractors are the other keepers' numbers and the rumour's.

Every item carries in ``meta``: ``roles`` (the K ``Role`` s of its world, by agent slot),
``informed`` (the slot that holds the gold number), ``distractors`` (the other numbers stated in
the world, all different from the gold one), ``topic``, ``variant`` and ``liar`` (the rumour's
slot, None for ``topics``). Runs give each agent its item's role (``prompts.item_roles``).

**Contrastive margin** (``gcache.io.runner.margin.answer_scores``): the gold number's mean log-probability per token
minus the highest of the distractor numbers', each teacher-forced after the answer line's prefix
from the same decision context, all in one forward. The answer log-probability alone also rises
with contexts that merely prime the answer format; the margin rises only when the context favours
the right number over the others stated in the world.

Splits: ``train`` and ``test`` hold ``SPLIT_SIZE`` worlds each, drawn from independent seeded
streams (``random.Random(f"gcache-routing:{variant}:{K}:{split}:{seed}:{index}")``), so a seed
reproduces its questions and no test world is a train world's copy.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from gcache.io.runner.prompts import Role
from gcache.io.tasks.datasets import Item

__all__ = [
    "TASK",
    "VARIANTS",
    "TOPICS",
    "SPLIT_SIZE",
    "MIN_AGENTS",
    "MAX_AGENTS",
    "RoutingOptions",
    "world",
    "load_items",
]

TASK = "routing"
VARIANTS = ("topics", "unreliable")
TOPICS = (
    "coins", "apples", "books", "keys", "stones", "shells", "lamps", "boats",
    "cups", "bells", "maps", "coats", "drums", "kites", "pens", "rings",
)  # fmt: skip
SPLIT_SIZE = 200
MIN_AGENTS, MAX_AGENTS = 2, len(TOPICS)
LOW, HIGH = 10, 99  # two-digit numbers: every one is a few tokens, none a prefix of another


@dataclass(frozen=True)
class RoutingOptions:
    """How routing worlds are drawn: the variant and the number of agents per world (K)."""

    variant: str = "topics"
    num_agents: int = 4

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"--routing-variant: expected one of {', '.join(VARIANTS)}, got {self.variant!r}")
        k = self.num_agents
        if isinstance(k, bool) or not isinstance(k, int) or not MIN_AGENTS <= k <= MAX_AGENTS:
            raise ValueError(
                f"--agent-nums: a routing world needs {MIN_AGENTS} to {MAX_AGENTS} agents (one informed, "
                f"the others distractors), got {k!r}"
            )


def _keeper(topic: str, number: int) -> Role:
    name = f"{topic.capitalize()} Keeper"
    return Role(
        name=name,
        profile=f"{name}: keeps the count of {topic}.",
        instruction=f"You are the {name}. When asked how many {topic} there are, the answer is {number}.",
    )


def _rumor_monger(topic: str, number: int) -> Role:
    return Role(
        name="Rumor Monger",
        profile="Rumor Monger: repeats rumors, usually wrong.",
        instruction=(f"You are the Rumor Monger: you repeat rumors, usually wrong. "
                     f"When asked how many {topic} there are, the answer is {number}."),
    )  # fmt: skip


def world(split: str, index: int, *, seed: int = 0, options: RoutingOptions = RoutingOptions()) -> Item:
    """The routing question number ``index`` of ``split`` under ``seed`` (the module docstring says
    how it is drawn). Raises ValueError for a bad split or a negative index."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"index: expected an int >= 0, got {index!r}")
    k = options.num_agents
    rng = random.Random(f"gcache-routing:{options.variant}:{k}:{split}:{seed}:{index}")
    liar = options.variant == "unreliable"
    keepers = k - 1 if liar else k
    topics = rng.sample(TOPICS, keepers)
    numbers = rng.sample(range(LOW, HIGH + 1), k)  # distinct: every stated number tells its agent apart
    asked = rng.randrange(keepers)  # the asked topic is topics[asked], its keeper holds numbers[asked]
    roles = [_keeper(t, n) for t, n in zip(topics, numbers)]
    informed = rng.randrange(k)
    # Slots: the informed keeper takes ``informed``, the others keep their drawn order around it.
    others = [r for i, r in enumerate(roles) if i != asked]
    if liar:
        slot = rng.choice([s for s in range(k) if s != informed])
        rumor = _rumor_monger(topics[asked], numbers[-1])
        order: list[Role] = []
        rest = iter(others)
        for s in range(k):
            order.append(roles[asked] if s == informed else rumor if s == slot else next(rest))
    else:
        slot = None
        order = others[:informed] + [roles[asked]] + others[informed:]
    topic = topics[asked]
    gold = numbers[asked]
    distractors = tuple(str(n) for i, n in enumerate(numbers) if i != asked)
    return Item(
        id=f"{TASK}/{options.variant}/{split}/{index}",
        task=TASK,
        index=index,
        question=f"How many {topic} are there?",
        gold=str(gold),
        meta={"roles": tuple(order), "informed": informed, "distractors": distractors, "topic": topic,
              "variant": options.variant, "liar": slot},
    )  # fmt: skip


def load_items(
    split: str = "test", *, limit: int | None = None, question_id: int | str | None = None, seed: int = 0,
    options: RoutingOptions = RoutingOptions(),
) -> list[Item]:  # fmt: skip
    """The ``SPLIT_SIZE`` worlds of ``split`` (or the first ``limit``, or the one ``question_id``:
    an index or an item id). Raises ValueError for a bad split, limit or question_id."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not isinstance(options, RoutingOptions):
        raise TypeError(f"options: expected RoutingOptions, got {type(options).__name__}")
    if question_id is not None:
        if isinstance(question_id, str):
            prefix = f"{TASK}/{options.variant}/{split}/"
            tail = question_id[len(prefix):] if question_id.startswith(prefix) else ""
            if not tail.isdigit():
                raise ValueError(f"task {TASK}: no item with id {question_id!r} in the {split} split")
            question_id = int(tail)
        if isinstance(question_id, bool) or not isinstance(question_id, int) or not 0 <= question_id < SPLIT_SIZE:
            raise ValueError(f"task {TASK}: question_id {question_id!r} is out of range (0..{SPLIT_SIZE - 1})")
        return [world(split, question_id, seed=seed, options=options)]
    n = SPLIT_SIZE if limit is None else min(limit, SPLIT_SIZE)
    return [world(split, i, seed=seed, options=options) for i in range(n)]
