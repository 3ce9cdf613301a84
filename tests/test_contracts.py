"""Each task family's answer contract (gcache.io.tasks.contracts) holds together: the line a
decision node writes from it is complete, read back as the gold and judged correct, and the
prompt's instruction asks for that line."""

import pytest

from gcache.io.runner.answers import answer_target
from gcache.io.runner.prompts import answer_format
from gcache.io.tasks.contracts import CONTRACTS, contract, family_contract
from gcache.io.tasks.datasets import TASKS, load_items, task_family
from gcache.io.tasks.scoring import score


@pytest.mark.parametrize("task", TASKS)
def test_the_reference_line_is_complete_read_back_and_correct(task):
    item = load_items(task, "test", limit=1)[0]
    answer = contract(task)
    line = answer.prefix + answer.reference(item) + "\n"
    assert answer.complete(line) and not answer.complete(answer.prefix)
    assert answer_target(item).prefix == answer.prefix
    assert answer.prefix.strip() in answer_format(task, entry_point=item.meta.get("entry_point"))
    if answer.runs_programs:
        assert answer.prediction(item, line).strip() == item.gold.strip()
        with pytest.raises(ValueError, match="judged by running"):
            answer.correct(item, item.gold)
    else:
        assert answer.correct(item, answer.prediction(item, line))
        assert not answer.correct(item, None)
        assert score(item, line).correct


def test_every_family_has_one_contract_and_an_unknown_one_is_named():
    assert {task_family(t) for t in TASKS} == set(CONTRACTS)
    with pytest.raises(ValueError, match="family: expected one of 'math'"):
        family_contract("poetry")
    with pytest.raises(ValueError, match="unknown task"):
        contract("poetry")
