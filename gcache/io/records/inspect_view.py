"""``gcache inspect``'s output from its plain data (an ``inspect.json``): terminal tables and a PNG.

Both read the JSON form of ``gcache.io.runner.inspection.Inspection`` (``to_json``), so a saved
``inspect.json`` is drawn again without rerunning the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table


def _tokens(pairs: list, digits: int = 2) -> str:
    return "  ".join(f"{tok!r} {value:.{digits}f}" for tok, value in pairs)


def question_tables(question: dict[str, Any]) -> list[Table]:
    """Tables of one inspected question: edges, latent tokens, fusion weights, judger attention."""
    tables = []
    edges = Table(title=f"{question['id']}: edges (p: the policy's probability; 1 for fixed edges)")
    for col in ("src", "dst", "p", "taken"):
        edges.add_column(col, justify="right" if col == "p" else "left")
    for e in question["edges"]:
        edges.add_row(e["src"], e["dst"], f"{e['p']:.3f}", "yes" if e["taken"] else "-")
    tables.append(edges)

    thoughts = Table(title="latent steps: top tokens through lm_head (probability) and nearest input embeddings (cosine)")
    for col in ("agent", "reads", "step", "lm_head", "embedding"):
        thoughts.add_column(col, overflow="fold")
    for a in question["agents"]:
        for s in a["steps"]:
            thoughts.add_row(f"{a['node']} {a['role']}", ", ".join(a["inputs"]) or "-", str(s["step"]),
                             _tokens(s["head"]), _tokens(s["embedding"]))  # fmt: skip
    tables.append(thoughts)

    if question["fusion"]:
        fusion = Table(title="fusion: per source, edge weight, normalised weight, per-layer coefficient")
        for col in ("node", "mode", "source", "edge", "weight", "coefficient per layer"):
            fusion.add_column(col, overflow="fold")
        for f in question["fusion"]:
            for i, src in enumerate(f["sources"]):
                w = "-" if f["source_weights"] is None else f"{f['source_weights'][i]:.3f}"
                c = "- (positions side by side)" if f["coefficients"] is None else " ".join(f"{v:.3f}" for v in f["coefficients"][i])
                fusion.add_row(f["node"], f["mode"], src, f"{f['edge_weights'][i]:.3f}", w, c)
        tables.append(fusion)

    att = question.get("attention")
    if att is not None:
        how = "cache positions by the agent that wrote them" if att["attribution"] == "positions" else (
            "mixed cache positions attributed by fusion coefficient")
        table = Table(title=f"judger attention on the answer tokens {''.join(att['queries'])!r} ({how})")
        table.add_column("layer")
        for src, n in zip(att["sources"], att["positions"]):
            table.add_column(f"{src}\n({n:.4g} pos)", justify="right")
        for layer, row in enumerate(att["per_layer"]):
            table.add_row(str(layer), *(f"{v:.3f}" for v in row))
        table.add_row("mean", *(f"{v:.3f}" for v in att["mean"]), style="bold")
        tables.append(table)
    return tables


def answer_line(question: dict[str, Any]) -> str:
    """One line: the rerun's answer against the recorded one and the gold."""
    same = question["recorded"] is None or question["answer"] == question["recorded"]
    recorded = "not in the run's results" if question["recorded"] is None else ("same as recorded" if same else
                                                                                f"recorded {question['recorded']!r}")
    return f"{question['id']} (gold {question['gold']}): rerun answer {question['answer'][:120]!r}, {recorded}"


def plot_inspection(data: dict[str, Any], path: Path) -> Path:
    """Per question: the judger's attention by source and layer (heat map) and each agent's latent
    tokens (top-1 through lm_head / by cosine, per step); write a PNG."""
    import matplotlib  # here, not at the top: matplotlib.pyplot costs seconds to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    questions = data["questions"]
    rows = max(1, len(questions))
    layers = max((len(q["attention"]["per_layer"]) for q in questions if q.get("attention")), default=1)
    height = max(4.2, 0.24 * (layers + 1) + 1.8)  # a readable row per layer
    fig, axes = plt.subplots(rows, 2, figsize=(14, height * rows), squeeze=False, gridspec_kw={"width_ratios": [1, 1.4]})
    for (ax_h, ax_t), q in zip(axes, questions):
        att = q.get("attention")
        if att is None:
            ax_h.text(0.5, 0.5, "no judger: the decision rule took an agent's text", ha="center", va="center")
            ax_h.axis("off")
        else:
            values = att["per_layer"] + [att["mean"]]
            im = ax_h.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
            ax_h.set_xticks(range(len(att["sources"])), [s.replace(":", ":\n", 1) for s in att["sources"]], fontsize=8)
            ax_h.set_yticks(range(len(values)), [f"layer {i}" for i in range(len(att["per_layer"]))] + ["mean"], fontsize=8)
            for y, row in enumerate(values):
                for x, v in enumerate(row):
                    ax_h.text(x, y, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
            fig.colorbar(im, ax=ax_h, fraction=0.04)
            how = "positions" if att["attribution"] == "positions" else "fusion coefficients"
            ax_h.set_title(f"{q['id']}: judger attention by source ({how})", fontsize=9)
        lines = [f"{q['id']}  answer {q['answer'][:40]!r}  gold {q['gold']}", ""]
        for a in q["agents"]:
            head = " ".join(f"{s['head'][0][0]!r}" for s in a["steps"])
            emb = " ".join(f"{s['embedding'][0][0]!r}" for s in a["steps"])
            lines.append(f"{a['node']} {a['role'][:24]} <- {', '.join(a['inputs']) or '-'}")
            lines.append(f"   lm_head:   {head}"[:110])
            lines.append(f"   embedding: {emb}"[:110])
        ax_t.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8)
        ax_t.set_title("latent tokens per step (top-1)", fontsize=9, loc="left")
        ax_t.axis("off")
    fig.suptitle(f"{data['task']} / {data['method']} / {data['model']}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["answer_line", "plot_inspection", "question_tables"]
