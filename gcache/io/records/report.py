"""Tables and the topology figure of a run, from its results.jsonl records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from gcache.io.records.runlog import summarize
from gcache.io.records.stats import format_interval


def records_table(summary: dict, records: list[dict]) -> Table:
    """One row per phase: questions, accuracy, mean answer log-probability [95% CI], tokens,
    seconds per question, errors, retries.

    Each question counts once, by its latest line in ``records`` (every line of results.jsonl);
    ``retries`` counts the earlier, errored lines that a retry replaced.
    """
    table = Table(title=f"{summary.get('task')} / {summary.get('method')} ({summary.get('generation_mode')})")
    columns = ("phase", "n", "accuracy", "answer logprob [95% CI]", "prompt tok", "latent tok", "generated tok",
               "s / question", "errors", "retries")
    for col in columns:
        table.add_column(col, justify="left" if col == "phase" else "right")
    for phase in ("train", "eval"):
        s = summarize(r for r in records if r["phase"] == phase)
        if not s["n"]:
            continue
        t = s["tokens"]
        table.add_row(
            phase, str(s["n"]), _accuracy(s["accuracy"]), format_interval(s["answer_logprob"]),
            str(t["prompt"]), str(t["latent"]), str(t["generated"]), f"{s['seconds'] / s['n']:.2f}", str(s["errors"]),
            str(s["retries"]),
        )
    return table


def _accuracy(value: float | None) -> str:
    return "not decoded" if value is None else f"{value:.3f}"


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


def curve_table(curve: list[dict]) -> Table:
    """The learning curve as a table: step, questions, mean reward, mean answer log-probability,
    the step's policy and fuser losses."""
    table = Table(title="learning curve (train)")
    for col in ("step", "n", "reward", "answer logprob", "policy loss", "fuser loss"):
        table.add_column(col, justify="right")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for c in curve:
        table.add_row(str(c["step"]), str(c["n"]), fmt(c["reward"]), fmt(c["answer_logprob"]),
                      fmt(c.get("policy_loss")), fmt(c.get("fuser_loss")))
    return table


def edge_table(names: list[str], probs: np.ndarray, counts: np.ndarray) -> Table:
    """The learned graph: every edge with a positive mean probability, most likely first."""
    table = Table(title="learned graph (eval): edge probabilities")
    for col in ("from", "to", "mean p", "taken"):
        table.add_column(col, justify="left" if col in ("from", "to") else "right")
    edges = [(probs[i, j], i, j) for i in range(len(names)) for j in range(len(names)) if probs[i, j] > 0]
    for p, i, j in sorted(edges, reverse=True):
        table.add_row(names[i], names[j], f"{p:.3f}", str(int(counts[i, j])))
    return table


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


def plot_topology(names: list[str], probs: np.ndarray, counts: np.ndarray, path: Path, *, title: str = "") -> Path:
    """Draw the mean edge probabilities as a heat map and as a graph; write a PNG."""
    import matplotlib  # here, not at the top: matplotlib.pyplot costs ~4 s to import, measured on this machine

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_g) = plt.subplots(1, 2, figsize=(12, 5.5))
    im = ax_h.imshow(probs, vmin=0.0, vmax=1.0, cmap="viridis")
    ax_h.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax_h.set_yticks(range(len(names)), names, fontsize=8)
    ax_h.set_xlabel("to")
    ax_h.set_ylabel("from")
    for i in range(len(names)):
        for j in range(len(names)):
            if probs[i, j] > 0:
                ax_h.text(j, i, f"{probs[i, j]:.2f}", ha="center", va="center", fontsize=7, color="w")
    fig.colorbar(im, ax=ax_h, label="mean edge probability")

    angles = np.linspace(0, 2 * np.pi, len(names), endpoint=False)
    xy = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    for i in range(len(names)):
        for j in range(len(names)):
            if probs[i, j] > 0:
                ax_g.annotate(
                    "", xy=xy[j] * 0.88, xytext=xy[i] * 0.88,
                    arrowprops=dict(arrowstyle="->", lw=0.5 + 3 * probs[i, j], alpha=0.15 + 0.85 * probs[i, j]),
                )
    ax_g.scatter(xy[:, 0], xy[:, 1], s=900, c="lightsteelblue", zorder=3)
    for (x, y), name in zip(xy, names):
        ax_g.text(x, y, name, ha="center", va="center", fontsize=7, zorder=4)
    ax_g.set_xlim(-1.4, 1.4)
    ax_g.set_ylim(-1.4, 1.4)
    ax_g.set_aspect("equal")
    ax_g.axis("off")
    fig.suptitle(title + " — learned communication topology (eval)")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    """Lay out, write the PNG, release the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
