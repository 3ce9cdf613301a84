"""Tables and the topology figure of a run, from its results.jsonl records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.table import Table

from gcache.io.runlog import summarize


def records_table(summary: dict, records: list[dict]) -> Table:
    """One row per phase: questions, accuracy, tokens, seconds per question, errors, retries.

    Each question counts once, by its latest line in ``records`` (every line of results.jsonl);
    ``retries`` counts the earlier, errored lines that a retry replaced.
    """
    table = Table(title=f"{summary.get('task')} / {summary.get('method')} ({summary.get('generation_mode')})")
    for col in ("phase", "n", "accuracy", "prompt tok", "latent tok", "generated tok", "s / question", "errors", "retries"):
        table.add_column(col, justify="left" if col == "phase" else "right")
    for phase in ("train", "eval"):
        s = summarize(r for r in records if r["phase"] == phase)
        if not s["n"]:
            continue
        t = s["tokens"]
        table.add_row(
            phase, str(s["n"]), f"{s['accuracy']:.3f}", str(t["prompt"]), str(t["latent"]), str(t["generated"]),
            f"{s['seconds'] / s['n']:.2f}", str(s["errors"]), str(s["retries"]),
        )
    return table


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
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
