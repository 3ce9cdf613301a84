"""Loaders, splits, bad input and scoring of the five benchmark tasks."""

import csv
import dataclasses
import gzip

import pytest

from gcache.io.tasks.datasets import TASKS, RowError, data_dir, load_items, parse_rows, task_family
from gcache.io.tasks.scoring import Verdict, gold_replies, run_examples, score, score_many


def both_splits(task):
    return load_items(task, "train") + load_items(task, "test")


def test_families_and_unknown_task():
    assert [task_family(t) for t in TASKS] == ["math", "science", "medicine", "code", "code", "math"]
    with pytest.raises(ValueError, match="unknown task 'mmlu'.*gsm8k"):
        load_items("mmlu")
    with pytest.raises(ValueError, match="split"):
        load_items("gsm8k", "dev")
    with pytest.raises(ValueError, match="limit"):
        load_items("gsm8k", limit=0)


@pytest.mark.parametrize("task, rows", [("gpqa", 198), ("medqa", 300), ("humaneval", 164), ("mbppplus", 399)])
def test_seeded_split_partitions_the_file(task, rows):
    train, test = load_items(task, "train"), load_items(task, "test")
    ids_train, ids_test = {it.index for it in train}, {it.index for it in test}
    assert not ids_train & ids_test
    assert ids_train | ids_test == set(range(rows))
    assert len(ids_train) == round(0.2 * rows)
    assert [it.index for it in test] == sorted(ids_test)
    assert load_items(task, "train") == train  # deterministic
    other = {it.index for it in load_items(task, "train", seed=1)}
    assert other != ids_train


def test_gsm8k_uses_the_official_files():
    assert len(load_items("gsm8k", "train")) == 7473
    test = load_items("gsm8k", "test")
    assert len(test) == 1319
    assert test[0].gold == "18" and test[0].id == "gsm8k/test/0"


def test_question_id_and_limit():
    assert [it.id for it in load_items("humaneval", "test", limit=3)] == [it.id for it in load_items("humaneval")[:3]]
    some = load_items("humaneval", "test")[5]
    assert load_items("humaneval", "test", question_id=some.index) == [some]
    assert load_items("humaneval", "test", question_id=some.id) == [some]
    with pytest.raises(ValueError, match="humaneval.*out of range.*0..163"):
        load_items("humaneval", question_id=164)
    train_row = load_items("humaneval", "train")[0].index
    with pytest.raises(ValueError, match="other split"):
        load_items("humaneval", "test", question_id=train_row)
    with pytest.raises(ValueError, match="no item with id"):
        load_items("gsm8k", question_id="gsm8k/test/999999")
    with pytest.raises(TypeError, match="question_id"):
        load_items("gsm8k", question_id=1.5)


def test_gpqa_options_are_shuffled_per_question_and_gold_is_the_correct_answer():
    with gzip.open(data_dir() / "gpqa_diamond.csv.gz", "rt", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    items = both_splits("gpqa")
    assert len(items) == 198
    for item in items:
        row = rows[item.index]
        options = item.meta["options"]
        assert sorted(options) == sorted(row[k].strip() for k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3"))
        assert options["ABCD".index(item.gold)] == row["Correct Answer"].strip()
        assert f"{item.gold}. {row['Correct Answer'].strip()}" in item.question
    letters = [it.gold for it in items]
    assert all(20 < letters.count(x) < 80 for x in "ABCD")  # not always the same position
    assert both_splits("gpqa") == items


def test_medqa_options_appear_once_and_gold_matches_answer():
    items = both_splits("medqa")
    assert len(items) == 300
    for item in items[:50]:
        assert item.question.count("\nA. ") == 1
        assert item.gold in "ABCD"


def test_items_are_frozen():
    item = load_items("gsm8k", limit=1)[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        item.gold = "1"


def test_malformed_rows_are_reported_and_skipped(caplog):
    good = {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}
    rows = [good, {"question": "no answer"}, {"question": 7, "answer": "#### 1"}, "not a row",
            {"question": "q", "answer": "no marker"}, good]
    items, errors = parse_rows("gsm8k", rows)
    assert [it.index for it in items] == [0, 5]
    assert [(e.row, e.field) for e in errors] == [(1, "answer"), (2, "question"), (3, "<row>"), (4, "answer")]
    assert "task gsm8k, row 2, field 'question': expected str, got int" == str(errors[1])
    items, errors = parse_rows("mbppplus", [{"task_id": "Mbpp/1", "prompt": "p", "entry_point": "f",
                                             "canonical_solution": "def f(): pass", "base_input": "[[1]]",
                                             "plus_input": [], "atol": 0}])
    assert not items and errors[0].field == "base_input"
    items, errors = parse_rows("medqa", [{"question": "q", "options": ["A. x", "B. y", "C. z", "D. w"], "answer": "nothing"}])
    assert not items and errors[0] == RowError("medqa", 0, "answer", "matches 0 options, expected exactly 1")


@pytest.mark.parametrize("task", ["gsm8k", "gpqa", "medqa"])
def test_gold_answers_in_five_styles_score_100_percent(task):
    items = both_splits(task)
    pairs = [(it, reply) for it in items for reply in gold_replies(it)]
    assert len({r for it, r in pairs[:5]}) == 5
    verdicts = score_many([p[0] for p in pairs], [p[1] for p in pairs])
    wrong = [(p[0].id, p[1], v) for p, v in zip(pairs, verdicts) if not v.correct]
    assert not wrong, wrong[:3]


def test_wrong_answers_score_zero():
    item = load_items("gsm8k", limit=1)[0]
    assert score(item, "#### -18") == Verdict(False, "-18", None)
    assert score(item, "#### 18.5").correct is False
    assert score(item, "I don't know").error is not None
    mc = load_items("medqa", limit=1)[0]
    wrong_letter = next(x for x in "ABCD" if x != mc.gold)
    assert score(mc, f"Answer: {wrong_letter}").correct is False
    assert score(mc, f"Answer: {mc.gold}").correct is True


def _wrong_variant(item):
    """The canonical program, with the entry point's results perturbed."""
    ep = item.meta["entry_point"]
    return (
        f"```python\n{item.gold}\n"
        f"_original = {ep}\n"
        f"def {ep}(*args, **kwargs):\n"
        f"    r = _original(*args, **kwargs)\n"
        "    if isinstance(r, bool):\n        return not r\n"
        "    if isinstance(r, (int, float)):\n        return r + 1\n"
        "    if isinstance(r, str):\n        return r + 'x'\n"
        "    if isinstance(r, list):\n        return r + [None]\n"
        "    if isinstance(r, tuple):\n        return r + (None,)\n"
        "    return object()\n```\n"
    )


def test_known_wrong_variants_fail_on_20_tasks():
    items = load_items("humaneval", "test", limit=10) + [
        it for it in load_items("mbppplus", "test", limit=12) if it.meta["entry_point"] not in ("are_equivalent", "sum_div")
    ][:10]
    assert len(items) == 20
    verdicts = score_many(items, [_wrong_variant(it) for it in items])
    assert not [it.id for it, v in zip(items, verdicts) if v.correct]
    # and the untouched canonical programs of the same tasks pass
    verdicts = score_many(items, [f"```python\n{it.gold}\n```" for it in items])
    assert all(v.correct for v in verdicts), [(it.id, v.error) for it, v in zip(items, verdicts) if not v.correct]


def test_humaneval_body_only_reply_is_completed_with_the_prompt():
    item = load_items("humaneval", "test", limit=1)[0]
    assert score(item, item.meta["canonical_solution"]).correct
    assert not score(item, "def nothing():\n    pass\n").correct


def test_sandbox_problems_become_verdict_errors():
    item = load_items("humaneval", limit=1)[0]
    verdict = score(item, "```python\ndef broken(:\n```")
    assert verdict.correct is False and "SyntaxError" in verdict.error
    verdict = score(item, "```python\nimport os\nos._exit(0)\n```")
    assert verdict.correct is False and verdict.error


def test_run_examples_checks_the_prompt_examples():
    he = load_items("humaneval", "test", limit=1)[0]
    assert run_examples(he, he.gold)
    assert not run_examples(he, _wrong_variant(he))
    mb = load_items("mbppplus", "test", limit=1)[0]
    assert run_examples(mb, mb.gold)
    assert not run_examples(mb, _wrong_variant(mb))
    with pytest.raises(ValueError, match="code task"):
        run_examples(load_items("gsm8k", limit=1)[0], "x")


@pytest.mark.slow
@pytest.mark.parametrize("task, size", [("humaneval", 164), ("mbppplus", 399)])
def test_canonical_solutions_all_pass(task, size):
    items = both_splits(task)
    verdicts = score_many(items, gold_replies_flat(items))
    failed = [(it.id, v.error) for it, v in zip(items, verdicts) if not v.correct]
    assert len(items) == size and not failed, failed


def gold_replies_flat(items):
    return [gold_replies(it)[0] for it in items]
