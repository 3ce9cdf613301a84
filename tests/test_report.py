"""Summaries and report pieces over results.jsonl records: the mean answer log-probability with
its interval, the learning curve per training step, the learned graph's table, the PNG."""

import csv
import io
import json
import math

from rich.console import Console
from typer.testing import CliRunner

from gcache.io.records.report import (
    COMPARE_COLUMNS,
    COMPARE_FIELDS,
    PHASE_COLUMNS,
    compare_row,
    curve_table,
    edge_matrix,
    edge_table,
    fit_tables,
    learning_curve,
    learning_line,
    measures,
    plot_learning_curve,
    plot_topology,
    records_table,
    topology_plan,
)
from gcache.io.records.runlog import read_records, summarize
from gcache.io.records.stats import format_interval, mean_ci
from gcache_cli.main import app


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


def _run_folder(folder, *, method="gcache", n=3):
    """A finished run's folder with wide numbers: long token counts, negative log-probabilities."""
    folder.mkdir(parents=True)
    lines = []
    for i in range(n):
        lines.append({**record(f"t{i}", "train", logprob=-123.4567 - i, reward=-123.4567 - i, step=i // 2),
                      "tokens": {"prompt": 123456789, "latent": 98765, "generated": 4321}, "seconds": 1234.5, "correct": None})
        lines.append({**record(f"e{i}", logprob=-12.25 - i, correct=i == 0),
                      "tokens": {"prompt": 987654321, "latent": 56789, "generated": 8765}, "seconds": 2345.6})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = {"task": "gsm8k", "method": method, "generation_mode": "hybrid", "status": "complete", "total": n, "remaining": 0,
               **summarize(r for r in lines if r["phase"] == "eval")}
    (folder / "summary.json").write_text(json.dumps(summary))
    return summary


def _shown(summary):
    """The cells of a summary that a table must show in full."""
    lp, t = summary["answer_logprob"], summary["tokens"]
    accuracy = "not decoded" if summary["accuracy"] is None else f"{summary['accuracy']:.3f}"
    return [accuracy, f"{lp['mean']:.3f}", f"[{lp['low']:.3f}, {lp['high']:.3f}]",
            str(t["prompt"]), str(t["latent"]), str(t["generated"]), f"{summary['seconds'] / summary['n']:.2f}"]


def test_compare_and_report_show_every_number_in_full_in_80_columns(tmp_path):
    summaries = [_run_folder(tmp_path / name, method=m)
                 for name, m in (("gsm8k-gcache-learned-graph", "gcache"), ("gsm8k-latent-mas", "latent-mas"))]
    runner = CliRunner(env={"COLUMNS": "80"})
    result = runner.invoke(app, ["compare", str(tmp_path / "gsm8k-gcache-learned-graph"), str(tmp_path / "gsm8k-latent-mas")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.output
    for summary in summaries:
        for cell in _shown(summary):
            assert any(cell in line for line in lines), cell
    assert all(any(name in line for line in lines) for name in ("gsm8k-gcache-learned-graph", "gsm8k-latent-mas"))

    result = runner.invoke(app, ["report", str(tmp_path / "gsm8k-gcache-learned-graph"), "--no-png"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in result.output
    train = summarize(r for r in read_records(tmp_path / "gsm8k-gcache-learned-graph" / "results.jsonl")
                      if r["phase"] == "train")
    for cell in _shown(summaries[0]) + _shown(train) + ["-123.957", "-125.457"]:  # the curve: steps (t0, t1), (t2)
        assert any(cell in line for line in lines), cell


def test_fit_tables_folds_whole_columns_led_by_the_row_names():
    rows = [{"phase": "eval", **measures({"n": 2, "accuracy": 0.5, "answer_logprob": {"mean": -1.0, "low": -2.0,
                                                                                        "high": -0.5},
                                           "tokens": {"prompt": 1, "latent": 2, "generated": 3}, "seconds": 4.0,
                                           "errors": 0, "retries": 1})}]
    wide = fit_tables(PHASE_COLUMNS, rows, 500)
    assert len(wide) == 1 and [c.header for c in wide[0].columns] == [c.header for c in PHASE_COLUMNS]
    bands = fit_tables(PHASE_COLUMNS, rows, 60)
    assert len(bands) > 1 and all(b.columns[0].header == "phase" for b in bands)
    assert [c.header for b in bands for c in b.columns[1:]] == [c.header for c in PHASE_COLUMNS[1:]]


def test_the_formats_for_scripts_parse_back(tmp_path):
    summary = _run_folder(tmp_path / "a")
    runner = CliRunner()
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), "--format", "json"])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert row == compare_row("a", summary) and row["answer_logprob_low"] == summary["answer_logprob"]["low"]

    result = runner.invoke(app, ["compare", str(tmp_path / "a"), "--format", "csv"])
    (parsed,) = list(csv.DictReader(io.StringIO(result.output)))
    assert list(parsed) == list(COMPARE_FIELDS)
    assert {k: str(v) for k, v in row.items()} == parsed

    result = runner.invoke(app, ["compare", str(tmp_path / "a"), "--format", "markdown"])
    header, rule, line = result.output.strip().splitlines()
    cells = lambda text: [c.strip() for c in text.strip().strip("|").split("|")]  # noqa: E731
    assert cells(header) == [c.header for c in COMPARE_COLUMNS]
    assert cells(line) == [c.cell(row) for c in COMPARE_COLUMNS] and set(rule) <= set("|:-")

    result = runner.invoke(app, ["report", str(tmp_path / "a"), "--format", "json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [r["phase"] for r in doc["phases"]] == ["train", "eval"] and doc["summary"] == summary
    assert [c["step"] for c in doc["curve"]] == [0, 1]
    assert not (tmp_path / "a" / "topology.png").exists()  # no plots unless asked, outside --format text
    result = runner.invoke(app, ["report", str(tmp_path / "a"), "--format", "csv"])
    assert [r["phase"] for r in csv.DictReader(io.StringIO(result.output))] == ["train", "eval"]
    result = runner.invoke(app, ["compare", str(tmp_path / "a"), "--format", "xml"])
    assert result.exit_code == 2 and "--format" in result.output


def test_the_graph_picture_draws_one_arrow_per_directed_edge_by_probability(tmp_path):
    edge = lambda s, d, p, taken=False: {"src": s, "dst": d, "kind": "spatial", "p": p, "taken": taken}  # noqa: E731
    records = [
        {"phase": "eval", "decision_inputs": ["1:B", "2:C"],
         "edges": [edge("0:A", "1:B", 0.9, True), edge("1:B", "0:A", 0.3), edge("0:A", "2:C", 0.5)]},
        {"phase": "eval", "decision_inputs": ["2:C"],
         "edges": [edge("0:A", "1:B", 0.7, True), edge("1:B", "0:A", 0.1), edge("0:A", "2:C", 0.6, True)]},
        {"phase": "train", "edges": [edge("2:C", "1:B", 0.9, True)]},  # another phase: not drawn
    ]
    plan = topology_plan(records)
    assert plan.names == ["0:A", "1:B", "2:C", "decision"] and plan.learned
    arrows = {(a.src, a.dst): a for a in plan.arrows}
    assert sorted(arrows) == [(0, 1), (0, 2), (1, 0), (1, 3), (2, 3)]
    assert math.isclose(arrows[0, 1].p, 0.8) and arrows[0, 1].taken == 1.0 and arrows[0, 2].taken == 0.5
    assert math.isclose(arrows[1, 0].p, 0.2) and arrows[1, 0].taken == 0.0
    # two opposite edges are two arrows bent apart; a one-way edge is straight
    assert arrows[0, 1].bend == arrows[1, 0].bend != 0 and arrows[0, 2].bend == 0
    # width and opacity grow with the probability
    by_p = sorted((a for a in plan.arrows if a.dst != 3), key=lambda a: a.p)
    assert [a.width for a in by_p] == sorted(a.width for a in by_p) and by_p[0].width < by_p[-1].width
    assert [a.alpha for a in by_p] == sorted(a.alpha for a in by_p)
    assert (arrows[1, 3].p, arrows[2, 3].p) == (0.5, 1.0)  # the share of questions each fed the decision node
    fixed = topology_plan([{"phase": "eval", "edges": [edge("0:A", "1:B", 1.0, True)]}])
    assert not fixed.learned and fixed.names == ["0:A", "1:B"]  # decision inputs not recorded: no decision node
    path = plot_topology(plan, tmp_path / "topology.png", title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
