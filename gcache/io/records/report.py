"""Tables and the topology figure of a run, from its results.jsonl records.

A table is rows of raw values (dicts, the JSON and CSV form) read through columns (a header and
how a row reads in it): printed with rich, folded into bands that fit a narrow terminal, or as
markdown."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from gcache.io.records.runlog import summarize


class Column(NamedTuple):
    """One column of a printed table: its header and how a row (a dict of raw values) reads in it."""

    header: str
    cell: Callable[[dict], str]
    left: bool = False  # names align left, numbers right


def _num(key: str, digits: int = 3) -> Callable[[dict], str]:
    return lambda row: "-" if row.get(key) is None else f"{row[key]:.{digits}f}"


def _int(key: str) -> Callable[[dict], str]:
    return lambda row: "-" if row.get(key) is None else str(row[key])


def _ci(row: dict) -> str:
    low, high = row.get("answer_logprob_low"), row.get("answer_logprob_high")
    return "-" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"


# the columns a run's numbers read in, after the columns that name the row (phase, or run/task/...)
_MEASURES = (
    Column("accuracy", lambda row: "not decoded" if row.get("accuracy") is None and row.get("n") else
           _num("accuracy")(row)),
    Column("logprob", _num("answer_logprob")),
    Column("95% CI", _ci),
    Column("prompt tok", _int("prompt_tokens")),
    Column("latent tok", _int("latent_tokens")),
    Column("gen tok", _int("generated_tokens")),
    Column("s/question", _num("seconds_per_question", 2)),
    Column("errors", _int("errors")),
    Column("retries", _int("retries")),
)
PHASE_COLUMNS = (Column("phase", _int("phase"), left=True), Column("n", _int("n")), *_MEASURES)
COMPARE_COLUMNS = (
    Column("run", _int("run"), left=True), Column("task", _int("task"), left=True),
    Column("method", _int("method"), left=True), Column("mode", _int("generation_mode"), left=True),
    Column("n", _int("n")), *_MEASURES,
)


MEASURE_FIELDS = ("n", "accuracy", "answer_logprob", "answer_logprob_low", "answer_logprob_high", "prompt_tokens",
                  "latent_tokens", "generated_tokens", "seconds_per_question", "errors", "retries")
PHASE_FIELDS = ("phase", *MEASURE_FIELDS)
COMPARE_FIELDS = ("run", "task", "method", "generation_mode", *MEASURE_FIELDS)


def measures(summary: dict) -> dict:
    """A summary's numbers as one flat row of raw values (None where absent), in MEASURE_FIELDS order:
    a summary of gcache.io.records.runlog.summarize, or summary.json."""
    n = summary.get("n") or 0
    tokens = summary.get("tokens") or {}
    interval = summary.get("answer_logprob") or {}
    seconds = summary.get("seconds")
    return {
        "n": n, "accuracy": summary.get("accuracy"), "answer_logprob": interval.get("mean"),
        "answer_logprob_low": interval.get("low"), "answer_logprob_high": interval.get("high"),
        "prompt_tokens": tokens.get("prompt"), "latent_tokens": tokens.get("latent"),
        "generated_tokens": tokens.get("generated"),
        "seconds_per_question": seconds / n if n and seconds is not None else None,
        "errors": summary.get("errors"), "retries": summary.get("retries"),
    }  # fmt: skip


def phase_rows(records: list[dict]) -> list[dict]:
    """One row (PHASE_FIELDS) per phase that has questions, train before eval.

    Each question counts once, by its latest line in ``records`` (every line of results.jsonl);
    ``retries`` counts the earlier, errored lines that a retry replaced.
    """
    rows = []
    for phase in ("train", "eval"):
        s = summarize(r for r in records if r["phase"] == phase)
        if s["n"]:
            rows.append({"phase": phase, **measures(s)})
    return rows


def compare_row(run: str, summary: dict) -> dict:
    """One run's row (COMPARE_FIELDS) of ``gcache compare``, from its summary.json."""
    return {"run": run, "task": summary.get("task"), "method": summary.get("method"),
            "generation_mode": summary.get("generation_mode"), **measures(summary)}


def table(columns: Sequence[Column], rows: list[dict], *, title: str | None = None) -> Table:
    """One rich table of ``rows``; number columns never wrap, so rich narrows the name columns first."""
    out = Table(title=title)
    for c in columns:
        out.add_column(c.header, justify="left" if c.left else "right", no_wrap=not c.left, overflow="fold")
    for row in rows:
        out.add_row(*(c.cell(row) for c in columns))
    return out


def fit_tables(
    columns: Sequence[Column], rows: list[dict], width: int, *, keys: int = 1, title: str | None = None
) -> list[Table]:
    """The table folded into bands of whole columns, each led by the first ``keys`` columns (what
    names a row) and no wider than ``width`` where that is possible, so that every number is shown
    in full in a narrow terminal; one table when everything fits."""
    console = Console(width=max(width, 1 << 14))
    natural = lambda cols: Measurement.get(console, console.options, table(cols, rows, title=title)).maximum  # noqa: E731
    lead, bands = list(columns[:keys]), [[]]
    for c in columns[keys:]:
        if bands[-1] and natural(lead + bands[-1] + [c]) > width:
            bands.append([])
        bands[-1].append(c)
    return [table(lead + band, rows, title=title if i == 0 else None) for i, band in enumerate(bands)]


def markdown_table(columns: Sequence[Column], rows: list[dict]) -> str:
    """The table as GitHub markdown, the cells as printed."""
    esc = lambda text: text.replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(esc(c.header) for c in columns) + " |",
             "|" + "|".join(":---" if c.left else "---:" for c in columns) + "|"]
    lines += ["| " + " | ".join(esc(c.cell(row)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def csv_text(fields: Sequence[str], rows: list[dict]) -> str:
    """The rows' raw values as CSV with a header line (None as an empty field)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(fields), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in fields} for row in rows)
    return buf.getvalue()


def records_table(summary: dict, records: list[dict]) -> Table:
    """One row per phase (PHASE_COLUMNS), titled by the run's task, method and generation mode."""
    return table(PHASE_COLUMNS, phase_rows(records), title=run_title(summary))


def run_title(summary: dict) -> str:
    return f"{summary.get('task')} / {summary.get('method')} ({summary.get('generation_mode')})"


def learning_curve(records: list[dict]) -> list[dict]:
    """Per training step (the train records' ``step``), in step order: the questions, their mean
    ``reward`` and mean ``answer_logprob`` (None where no record of the step has a finite one),
    and the step's ``policy_loss`` and ``fuser_loss`` (None where the step took none)."""
    steps: dict[int, list[dict]] = {}
    for r in records:
        if r.get("phase") == "train" and isinstance(r.get("step"), int):
            steps.setdefault(r["step"], []).append(r)
    curve = []
    for step in sorted(steps):
        rows = steps[step]
        curve.append({"step": step, "n": len(rows), "reward": _mean(r.get("reward") for r in rows),
                      "answer_logprob": _mean(r.get("answer_logprob") for r in rows),
                      "policy_loss": _mean(r.get("policy_loss") for r in rows),
                      "fuser_loss": _mean(r.get("fuser_loss") for r in rows)})
    return curve


def _mean(values) -> float | None:
    kept = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)]
    return float(np.mean(kept)) if kept else None


CURVE_COLUMNS = (
    Column("step", _int("step")), Column("n", _int("n")), Column("reward", _num("reward")),
    Column("answer logprob", _num("answer_logprob")), Column("policy loss", _num("policy_loss")),
    Column("fuser loss", _num("fuser_loss")),
)
EDGE_COLUMNS = (Column("from", _int("from"), left=True), Column("to", _int("to"), left=True),
                Column("mean p", _num("p")), Column("taken", _int("taken")))


def curve_table(curve: list[dict]) -> Table:
    """The learning curve as a table: step, questions, mean reward, mean answer log-probability,
    the step's policy and fuser losses."""
    return table(CURVE_COLUMNS, curve, title="learning curve (train)")


def edge_rows(names: list[str], probs: np.ndarray, counts: np.ndarray) -> list[dict]:
    """Every edge with a positive mean probability, most likely first: {"from", "to", "p", "taken"}."""
    edges = [(probs[i, j], i, j) for i in range(len(names)) for j in range(len(names)) if probs[i, j] > 0]
    return [{"from": names[i], "to": names[j], "p": float(p), "taken": int(counts[i, j])}
            for p, i, j in sorted(edges, reverse=True)]


def edge_table(names: list[str], probs: np.ndarray, counts: np.ndarray) -> Table:
    """The learned graph: every edge with a positive mean probability, most likely first."""
    return table(EDGE_COLUMNS, edge_rows(names, probs, counts), title="learned graph (eval): edge probabilities")


def learning_line(records: list[dict]) -> str | None:
    """One line on what training did (None without training steps): the mean reward of the
    first and last steps, and the learned edge probabilities at evaluation (untrained: 0.5)."""
    curve = [c for c in learning_curve(records) if c["reward"] is not None]
    if not curve:
        return None
    first, last = curve[0], curve[-1]
    line = (f"training: {len(curve)} steps, mean reward step {first['step'] + 1} {first['reward']:.3f} -> "
            f"step {last['step'] + 1} {last['reward']:.3f}")
    names, probs, _ = edge_matrix(records)
    learned = sorted(((probs[i, j], i, j) for i in range(len(names)) for j in range(len(names))
                      if 0 < probs[i, j] < 1), reverse=True)  # fixed edges have p = 1
    if learned:
        top = ", ".join(f"{names[i].split(':')[0]}->{names[j].split(':')[0]} {p:.2f}" for p, i, j in learned[:3])
        line += (f"; learned edge probabilities (eval mean, untrained 0.5) {learned[-1][0]:.2f}-{learned[0][0]:.2f}"
                 f" over {len(learned)} edges, most likely {top}")
    return line


def plot_learning_curve(
    curve: list[dict], path: Path, *, title: str = "", held_out: list[dict] | None = None
) -> Path:
    """The train reward per step (and, when given, the held-out mean answer log-probability
    [{"step", "mean", "low", "high"}] with its interval as a band); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    points = [(c["step"], c["reward"]) for c in curve if c.get("reward") is not None]
    if points:
        ax.plot(*zip(*points), marker="o", ms=3, lw=1, label="train reward (batch mean)")
    if held_out:
        xs = [h["step"] for h in held_out]
        ax.plot(xs, [h["mean"] for h in held_out], marker="s", ms=4, lw=1.5, color="C1",
                label="held-out mean answer log-probability")
        ax.fill_between(xs, [h["low"] for h in held_out], [h["high"] for h in held_out], color="C1", alpha=0.2,
                        label="95% CI")
    ax.set_xlabel("training step")
    ax.set_ylabel("reward / mean log-probability per answer token")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title + " — learning curve")
    return _save(fig, path)


def edge_matrix(
    records: list[dict], phase: str = "eval", kind: str = "spatial"
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Mean edge probability and the number of times each edge was taken, over a phase's records.

    Records carry ``edges`` as a list of {"src", "dst", "kind", "p", "taken"} with agents named
    "i:Role"; ``kind`` selects spatial (within a round) or temporal (between rounds) edges.
    Returns (names, probs [n, n], taken [n, n]).
    """
    names: list[str] = []
    sums: dict[tuple[str, str], float] = {}
    taken: dict[tuple[str, str], int] = {}
    n_rec: dict[tuple[str, str], int] = {}
    for r in records:
        if r["phase"] != phase:
            continue
        for e in r.get("edges") or []:
            if e.get("kind", "spatial") != kind:
                continue
            for node in (e["src"], e["dst"]):
                if node not in names:
                    names.append(node)
            key = (e["src"], e["dst"])
            sums[key] = sums.get(key, 0.0) + float(e["p"])
            n_rec[key] = n_rec.get(key, 0) + 1
            taken[key] = taken.get(key, 0) + int(bool(e.get("taken")))
    names.sort(key=lambda s: int(s.split(":", 1)[0]) if s.split(":", 1)[0].isdigit() else 1 << 30)
    idx = {name: i for i, name in enumerate(names)}
    probs = np.zeros((len(names), len(names)))
    counts = np.zeros((len(names), len(names)), dtype=int)
    for key, total in sums.items():
        probs[idx[key[0]], idx[key[1]]] = total / n_rec[key]
        counts[idx[key[0]], idx[key[1]]] = taken[key]
    return names, probs, counts


class Arrow(NamedTuple):
    """One directed edge of the graph picture."""

    src: int  # node index into TopologyPlan.names
    dst: int  # node index; the decision node is the last
    p: float  # mean edge probability; for a decision input, the share of questions it fed the decision node
    taken: float  # the share of the phase's questions whose graph took the edge
    width: float  # line width (points): edge_style(p); thinner for a decision input (wiring, not learned)
    alpha: float  # opacity: edge_style(p); likewise
    bend: float  # arc3 rad: 0, or +-BEND where the opposite edge is drawn too (two arrows, not one two-way)


class TopologyPlan(NamedTuple):
    """What plot_topology draws: the agents (then the decision node, when the records name its
    inputs) at their positions, and one arrow per directed edge."""

    names: list[str]  # agents "i:Role", then "decision" when drawn
    positions: np.ndarray  # [len(names), 2]
    arrows: list[Arrow]
    probs: np.ndarray  # [N, N] mean spatial edge probabilities among the agents (the heat map)
    learned: bool  # some edge has 0 < p < 1 (a policy's graph, not a fixed one)


BEND = 0.2


def edge_style(p: float) -> tuple[float, float]:
    """(line width, opacity) of an arrow of probability ``p``: both grow linearly from p = 0 to 1."""
    return 0.4 + 4.6 * p, 0.15 + 0.85 * p


def topology_plan(records: list[dict], phase: str = "eval") -> TopologyPlan:
    """The drawing plan of a phase's graph: the agents on an arc open to the right, the decision
    node on the right; an arrow per spatial edge with a positive mean probability (mean over the
    phase's records), bent where both directions are drawn; an arrow per agent that fed the
    decision node in some question (records' ``decision_inputs``; none when no record has them)."""
    names, probs, counts = edge_matrix(records, phase=phase)
    rows = [r for r in records if r.get("phase") == phase]
    n, questions = len(names), max(len(rows), 1)
    angles = np.deg2rad(180.0 if n == 1 else np.linspace(60.0, 300.0, n))
    positions = np.stack([np.cos(angles), np.sin(angles)], axis=-1).reshape(n, 2)
    arrows = []
    for i in range(n):
        for j in range(n):
            if probs[i, j] > 0:
                bend = BEND if probs[j, i] > 0 else 0.0
                p, taken = float(probs[i, j]), float(counts[i, j] / questions)
                arrows.append(Arrow(i, j, p, taken, *edge_style(p), bend))
    fed = [r["decision_inputs"] for r in rows if isinstance(r.get("decision_inputs"), list)]
    if fed and n:
        idx = {name: i for i, name in enumerate(names)}
        for name in names:
            share = sum(name in f for f in fed) / len(fed)
            if share > 0:
                arrows.append(Arrow(idx[name], n, share, share, 0.8 + 1.2 * share, 0.4 + 0.5 * share, 0.0))
        names = [*names, "decision"]
        positions = np.concatenate([positions, [[1.6, 0.0]]])
    learned = bool(((probs > 0) & (probs < 1)).any())
    return TopologyPlan(names, positions, arrows, probs, learned)


def _on_arc(start: np.ndarray, end: np.ndarray, bend: float, t: float) -> tuple[float, float]:
    """The point at ``t`` (0..1) of matplotlib's arc3 curve from start to end: a quadratic Bezier
    whose control point is the chord's midpoint moved by rad * (dy, -dx)."""
    (x1, y1), (x2, y2) = start, end
    cx, cy = (x1 + x2) / 2 + bend * (y2 - y1), (y1 + y2) / 2 - bend * (x2 - x1)
    u = 1 - t
    return u * u * x1 + 2 * u * t * cx + t * t * x2, u * u * y1 + 2 * u * t * cy + t * t * y2


def plot_topology(plan: TopologyPlan, path: Path, *, title: str = "") -> Path:
    """Draw a TopologyPlan: the agents' mean edge probabilities as a heat map, and the graph (one
    arrow per directed edge, width and opacity by probability, red where most questions' graphs
    took it, green dashed into the decision node, each labelled with its probability); write a PNG."""
    import matplotlib  # here, not at the top: matplotlib.pyplot costs ~4 s to import, measured on this machine

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    agents = plan.names[: len(plan.probs)]
    fig, (ax_h, ax_g) = plt.subplots(1, 2, figsize=(14, 6.5), gridspec_kw={"width_ratios": [1, 1.25]})
    im = ax_h.imshow(plan.probs, vmin=0.0, vmax=1.0, cmap="viridis")
    ax_h.set_xticks(range(len(agents)), agents, rotation=35, ha="right", fontsize=8)
    ax_h.set_yticks(range(len(agents)), agents, fontsize=8)
    ax_h.set_xlabel("to")
    ax_h.set_ylabel("from")
    for i in range(len(agents)):
        for j in range(len(agents)):
            if plan.probs[i, j] > 0:
                ax_h.text(j, i, f"{plan.probs[i, j]:.2f}", ha="center", va="center", fontsize=8,
                          color="k" if plan.probs[i, j] > 0.6 else "w")
    fig.colorbar(im, ax=ax_h, label="mean edge probability", shrink=0.8)

    xy, decision = plan.positions, len(agents)
    for a in plan.arrows:
        to_decision = a.dst == decision
        color = "C2" if to_decision else ("C3" if a.taken >= 0.5 else "0.35")
        ax_g.annotate(
            "", xy=xy[a.dst], xytext=xy[a.src],
            arrowprops={"arrowstyle": "-|>", "mutation_scale": 10 + 3 * a.width, "lw": a.width, "alpha": a.alpha,
                        "color": color, "linestyle": "--" if to_decision else "-", "shrinkA": 15, "shrinkB": 15,
                        "connectionstyle": f"arc3,rad={a.bend}"},
        )  # fmt: skip
        lx, ly = _on_arc(xy[a.src], xy[a.dst], a.bend, 0.35)  # nearer the source: crossing labels stay apart
        label = f"{a.p:.2f}" if not to_decision else (f"{a.p:.0%}" if a.p < 1 else "")
        if label:
            ax_g.text(lx, ly, label, fontsize=7, ha="center", va="center", color=color, zorder=5,
                      bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})
    ax_g.scatter(xy[:decision, 0], xy[:decision, 1], s=480, c="lightsteelblue", edgecolors="0.3", zorder=3)
    if len(plan.names) > decision:
        ax_g.scatter(*xy[decision], s=620, marker="s", c="palegreen", edgecolors="0.3", zorder=3)
    for k, ((x, y), name) in enumerate(zip(xy, plan.names)):
        ax_g.text(x, y, "D" if k == decision else name.split(":")[0], ha="center", va="center", fontsize=9,
                  fontweight="bold", zorder=4)
        # the name outside the node: away from the arc's centre (the decision node: below it)
        dx, dy = (0.0, -1.0) if k == decision else (x, y)
        ax_g.text(x + 0.2 * dx, y + 0.2 * dy, name, fontsize=9, zorder=4,
                  ha="left" if dx > 0.3 else "right" if dx < -0.3 else "center",
                  va="bottom" if dy > 0.3 else "top" if dy < -0.3 else "center")
    handles = [
        Line2D([], [], color="C3", lw=edge_style(0.5)[0], label="taken by most questions' graphs"),
        Line2D([], [], color="0.35", lw=edge_style(0.5)[0], alpha=edge_style(0.5)[1], label="not taken"),
        *(Line2D([], [], color="k", lw=w, alpha=o, label=f"p = {p:g}") for p in (0.25, 0.5, 1.0)
          for w, o in [edge_style(p)]),
    ]
    if len(plan.names) > decision:
        handles.append(Line2D([], [], color="C2", lw=2, ls="--", label="feeds the decision node D (share)"))
    ax_g.legend(handles=handles, loc="lower left", fontsize=7, frameon=False, bbox_to_anchor=(0.0, -0.12))
    ax_g.set_xlim(-2.2, 2.3)
    ax_g.set_ylim(-1.55, 1.35)
    ax_g.set_aspect("equal")
    ax_g.axis("off")
    kind = "learned" if plan.learned else "fixed"
    fig.suptitle(f"{title} — {kind} communication topology (eval, spatial edges)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Lay out, write the PNG, release the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
