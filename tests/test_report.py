"""Summaries and report pieces over results.jsonl records: the mean answer log-probability with
its interval, the learning curve per training step, the learned graph's table, the PNG."""

import math

from rich.console import Console

from gcache.io.records.report import (
    curve_table,
    edge_matrix,
    edge_table,
    learning_curve,
    learning_line,
    plot_learning_curve,
    records_table,
)
from gcache.io.records.runlog import summarize
from gcache.io.records.stats import format_interval, mean_ci


def record(i, phase="eval", *, logprob=None, reward=None, step=None, correct=False):
    r = {"id": str(i), "phase": phase, "correct": correct, "tokens": {"prompt": 1, "latent": 0, "generated": 1},
         "seconds": 0.1, "error": None, "answer_logprob": logprob}
    if reward is not None:
        r["reward"] = reward
    if step is not None:
        r["step"] = step
    return r


def test_summary_holds_the_mean_answer_logprob_and_its_interval_over_finite_values():
    values = [-2.0, -1.5, -3.25, -0.5, -2.75]
    records = [record(i, logprob=v) for i, v in enumerate(values)]
    records += [record(9, logprob=None), record(10, logprob=float("nan")), record(11, logprob=True)]
    s = summarize(records)
    assert s["n"] == 8
    assert s["answer_logprob"] == mean_ci(values).as_dict()
    assert math.isclose(s["answer_logprob"]["mean"], sum(values) / len(values))
    assert s["answer_logprob"]["n"] == 5
    assert summarize([record(0)])["answer_logprob"] is None
    assert format_interval(s["answer_logprob"]).startswith("-2.000 [")
    assert format_interval(None) == "-"


def test_learning_curve_averages_each_step_in_step_order():
    records = [
        record("a", "train", reward=-2.0, logprob=-2.0, step=1),
        record("b", "train", reward=-1.0, logprob=-1.0, step=1),
        record("c", "train", reward=-0.5, logprob=None, step=0),
        record("d", "eval", logprob=-9.0),
        record("e", "train", reward=None, step=2),
    ]
    records[0]["policy_loss"] = records[1]["policy_loss"] = 0.125  # a step's losses are on each of its lines
    records[0]["fuser_loss"] = records[1]["fuser_loss"] = 2.75
    curve = learning_curve(records)
    none = {"policy_loss": None, "fuser_loss": None}
    assert curve == [
        {"step": 0, "n": 1, "reward": -0.5, "answer_logprob": None, **none},
        {"step": 1, "n": 2, "reward": -1.5, "answer_logprob": -1.5, "policy_loss": 0.125, "fuser_loss": 2.75},
        {"step": 2, "n": 1, "reward": None, "answer_logprob": None, **none},
    ]
    console = Console(width=120, record=True)
    console.print(curve_table(curve))
    text = console.export_text()
    assert "-1.500" in text and "0.125" in text and "2.750" in text


def test_accuracy_is_not_decoded_where_no_line_was_decoded():
    decoded = [record("a", "train", reward=-1.0, step=0), record("b", "train", reward=-1.0, step=0)]
    decoded[0]["correct"] = True
    assert summarize(decoded)["accuracy"] == 0.5
    undecoded = [{**r, "correct": None} for r in decoded]
    assert summarize(undecoded)["accuracy"] is None
    console = Console(width=160, record=True)
    console.print(records_table({"task": "gsm8k", "method": "gcache"}, undecoded))
    assert "not decoded" in console.export_text()


def test_the_curve_plot_is_a_png(tmp_path):
    curve = [{"step": s, "n": 2, "reward": -2 + 0.1 * s, "answer_logprob": None} for s in range(5)]
    held = [{"step": s, "mean": -2 + 0.1 * s, "low": -2.2 + 0.1 * s, "high": -1.8 + 0.1 * s} for s in (0, 4)]
    path = plot_learning_curve(curve, tmp_path / "curve.png", title="t", held_out=held)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_edge_table_lists_learned_edges_most_likely_first():
    edges = [{"src": "0:A", "dst": "1:B", "kind": "spatial", "p": 0.9, "taken": True},
             {"src": "1:B", "dst": "0:A", "kind": "spatial", "p": 0.2, "taken": False}]
    names, probs, counts = edge_matrix([{"phase": "eval", "edges": edges}])
    console = Console(width=120, record=True)
    console.print(edge_table(names, probs, counts))
    text = console.export_text()
    assert text.index("0.900") < text.index("0.200")


def test_the_learning_line_gives_first_and_last_rewards_and_the_learned_edges_only():
    edge = lambda s, d, p: {"src": s, "dst": d, "kind": "spatial", "p": p, "taken": p > 0.5}  # noqa: E731
    records = [
        record("a", "train", reward=-2.0, step=0), record("b", "train", reward=-3.0, step=0),
        record("c", "train", reward=-1.0, step=1),
        {**record("d"), "edges": [edge("0:A", "1:B", 0.7), edge("1:B", "2:C", 0.2), edge("0:A", "2:C", 1.0)]},
        {**record("e"), "edges": [edge("0:A", "1:B", 0.5), edge("1:B", "2:C", 0.4), edge("0:A", "2:C", 1.0)]},
    ]
    line = learning_line(records)
    assert line.startswith("training: 2 steps, mean reward step 1 -2.500 -> step 2 -1.000")
    # 0->2 has p = 1 (a fixed edge): not a learned one
    assert "0.30-0.60 over 2 edges, most likely 0->1 0.60, 1->2 0.30" in line
    assert learning_line([record("x")]) is None
    assert "edge" not in learning_line(records[:3])
