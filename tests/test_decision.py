"""Decision rules (gcache.io.runner.decision) on scripted agent texts: who speaks, and which answer wins."""

from __future__ import annotations

from typing import NamedTuple

import pytest

from gcache.core.graph import DECISION, schedule
from gcache.core.sampling import fixed_topology
from gcache.core.topology import TopologyConfig, spatial_mask
from gcache.io.runner.decision import DECISIONS, majority
from gcache.io.tasks.datasets import load_items


class Said(NamedTuple):
    text: str | None


def _schedule(mode: str = "mesh", n: int = 3, wiring: str = "all"):
    config = TopologyConfig(n, mode=mode, optimize_spatial=False, optimize_temporal=False, wiring=wiring)
    return schedule(fixed_topology(spatial_mask(mode, n), config), 1)


def _said(sched, texts: list[str]) -> dict:
    return {src: Said(t) for src, t in zip(sched.sources(DECISION), texts)}


def _answer(rule: str, item, sched, outputs) -> str | None:
    node = DECISIONS[rule].decide(item, sched, outputs)
    return None if node is None else outputs[node].text or ""


@pytest.fixture(scope="module")
def gsm8k_item():
    return load_items("gsm8k", "test", limit=1)[0]


def test_vote_takes_the_most_common_answer_not_the_first_or_least(gsm8k_item):
    sched = _schedule(n=5)
    # "#### 5" and "The answer is 5" extract alike: 5 wins 2 to 1, though 9 comes first.
    outputs = _said(sched, ["#### 9", "#### 5", "#### 7", "The answer is 5", "#### 4"])
    assert _answer("vote", gsm8k_item, sched, outputs) == "#### 5"
    outputs = _said(sched, ["#### 1", "#### 2", "#### 2", "#### 2", "#### 1"])
    assert _answer("vote", gsm8k_item, sched, outputs) == "#### 2"


def test_vote_breaks_ties_by_the_first_given_and_falls_back_to_the_last_text(gsm8k_item):
    sched = _schedule(n=4)
    assert _answer("vote", gsm8k_item, sched, _said(sched, ["#### 8", "#### 6", "#### 6", "#### 8"])) == "#### 8"
    assert _answer("vote", gsm8k_item, sched, _said(sched, ["no", "idea", "at", "all"])) == "all"
    assert majority([None, "4", None, "4", "5"]) == 1
    assert majority([None, None]) is None


def test_direct_takes_the_last_agent_and_refer_leaves_it_to_the_judger(gsm8k_item):
    sched = _schedule("chain", n=3)
    outputs = {(0, 0): Said(None), (0, 1): Said(None), (0, 2): Said("#### 12")}
    assert _answer("direct", gsm8k_item, sched, outputs) == "#### 12"
    assert _answer("direct", gsm8k_item, sched, {(0, 2): Said(None)}) == ""
    assert DECISIONS["refer"].decide(gsm8k_item, sched, outputs) is None
    assert DECISIONS["direct"].decide(gsm8k_item, sched, outputs) == (0, 2)


def test_who_speaks_under_each_rule():
    sched = _schedule("chain", n=3, wiring="sinks")
    assert DECISIONS["refer"].speakers(sched) == frozenset()
    assert DECISIONS["direct"].speakers(sched) == {(0, 2)}
    assert DECISIONS["vote"].speakers(sched) == {(0, 2)}
    assert DECISIONS["code"].speakers(sched) == {(0, 2)}
    every = _schedule("chain", n=3, wiring="all")
    assert DECISIONS["vote"].speakers(every) == {(0, 0), (0, 1), (0, 2)}


def test_code_reads_the_sinks_when_agents_think_in_latent_space():
    assert DECISIONS["code"].wiring(accumulates=False, thinks=True) == "sinks"
    assert DECISIONS["code"].wiring(accumulates=False, thinks=False) == "all"
    for rule in ("refer", "direct", "vote"):
        assert DECISIONS[rule].wiring(accumulates=False, thinks=True) == "all"
        assert DECISIONS[rule].wiring(accumulates=True, thinks=True) == "sinks"


def test_code_takes_the_first_program_that_passes_the_examples():
    item = load_items("humaneval", "test", question_id=0)[0]  # has >>> examples in its prompt
    sched = _schedule(n=3)
    wrong = f"```python\ndef {item.meta['entry_point']}(*args, **kwargs):\n    return None\n```"
    right = f"```python\n{item.meta['prompt']}{item.gold}\n```"
    chosen = _answer("code", item, sched, _said(sched, [wrong, right, right + "\n# second"]))
    assert chosen == right
    assert _answer("code", item, sched, _said(sched, [wrong, wrong, "no code"])) is None


def test_rules_are_defined_once_and_named_like_their_flag():
    from gcache.io.runner.config import DECISIONS as FLAG_VALUES

    assert FLAG_VALUES == tuple(DECISIONS) == ("refer", "direct", "vote", "code")
    assert all(rule.name == name for name, rule in DECISIONS.items())
