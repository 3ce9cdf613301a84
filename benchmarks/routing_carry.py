"""What carries information on the embedded model: routing questions (gcache.io.tasks.routing) answered
with no agents, the oracle graph (only the informed agent feeds the decision node) and all agents
(every agent feeds the decision node), under each way of passing caches on.

Communication settings (rows): full caches versus latent-only ones (``--latent-only``: the sink
positions and the latent positions), 0 / 2 / 10 latent steps, 0 / 4 / 16 sink positions, concat
versus learned fusion (the fuser at its initial parameters: the gated mean of the caches; with one
input, the oracle's, it is that input). Measures: the gold answer's mean log-probability per token
and the contrastive margin (gold minus the best distractor number), each with its 95% bootstrap CI
over the worlds, and the paired difference oracle minus all agents.

How: per world the K agents think once, for the largest step count, on no input (in the oracle
and all-agents graphs no agent reads another), through gcache's own ``LatentCaches``; the cache
after s steps is that rollout's first prompt + s positions (causal: the same values as a rollout
of s steps, up to float round-off; checked on the first world, ``crop_check``), and a latent-only cache is cut from it by
``kv.latent_part`` as the runner cuts it. Every decision context is built by ``LatentCaches.context``
and read by ``gcache.io.runner.margin.answer_scores``, as ``gcache run`` records them.

    nice -n 10 python benchmarks/routing_carry.py --worlds 16            # topics
    nice -n 10 python benchmarks/routing_carry.py --variant unreliable   # the rumor monger

Writes benchmarks/results/routing_carry[_VARIANT].json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from gcache.core import cache as kv  # noqa: E402
from gcache.core.fusion import FuserConfig, init_fuser  # noqa: E402
from gcache.core.graph import DECISION, schedule  # noqa: E402
from gcache.core.topology import Topology  # noqa: E402
from gcache.io.runner.communication import LatentCaches  # noqa: E402
from gcache.io.runner.margin import answer_scores  # noqa: E402
from gcache.io.models.local import load_model, tiny_model  # noqa: E402
from gcache.io.runner.prompts import agent_roles  # noqa: E402
from gcache.io.tasks.routing import RoutingOptions, load_items  # noqa: E402
from gcache.io.records.stats import mean_ci, paired_diff_ci  # noqa: E402

MAX_STEPS = 10
# (name, latent_only, latent_steps, sink_positions, fusions measured on "all agents")
SETTINGS = [
    ("full, 0 steps", False, 0, 0, ("concat",)),
    ("full, 2 steps", False, 2, 0, ("concat", "learned")),
    ("full, 10 steps", False, 10, 0, ("concat", "learned")),
    ("latent-only, 2 steps, 4 sinks", True, 2, 4, ("concat",)),
    ("latent-only, 10 steps, 4 sinks (seed default)", True, 10, 4, ("concat", "learned")),
    ("latent-only, 10 steps, 0 sinks", True, 10, 0, ("concat",)),
    ("latent-only, 10 steps, 16 sinks", True, 10, 16, ("concat",)),
]


def graph(k: int, feeds: list[int]):
    """A one-round graph of k agents without edges between them; ``feeds`` feed the decision node."""
    inputs = torch.zeros(k, dtype=torch.bool)
    inputs[feeds] = True
    none = torch.zeros(k, k, dtype=torch.bool)
    return schedule(Topology(none, none.clone(), torch.arange(k), inputs, torch.zeros(())), 1)


def crop(cache: kv.KVCache, drop: int) -> kv.KVCache:
    """The cache without its last ``drop`` positions (the rollout as it stood ``drop`` steps earlier)."""
    if drop == 0:
        return cache
    return kv.KVCache(cache.keys[:, :, :, :-drop], cache.values[:, :, :, :-drop], cache.mask[:, :-drop], cache.next_pos - drop)


def passed_on(full: kv.KVCache, latent_only: bool, steps: int, sinks: int) -> kv.KVCache:
    cache = crop(full, MAX_STEPS - steps)
    return kv.latent_part(cache, steps, sinks) if latent_only else cache


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="topics")
    parser.add_argument("--agents", type=int, default=4, help="agents per world (K)")
    parser.add_argument("--worlds", type=int, default=16, help="test worlds measured")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random model, two worlds")
    parser.add_argument("--settings", type=int, nargs="*", default=None,
                        help="indices of SETTINGS to measure (default: all), with concat fusion only when given")
    parser.add_argument("--out", type=Path, default=_common.RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = _common.load_average()
    machine = _common.machine_info()
    local = tiny_model("llama", seed=0) if args.smoke else load_model("smollm2-135m", dtype="float32")
    worlds = 2 if args.smoke else args.worlds
    options = RoutingOptions(args.variant, args.agents)
    items = load_items("test", limit=worlds, seed=args.seed, options=options)
    k = args.agents
    roles = agent_roles("routing", n=k)  # replaced per world by the item's own roles
    comm = {f: LatentCaches("routing", local, roles, latent_steps=MAX_STEPS, latent_only=False, sink_positions=0, fusion=f)
            for f in ("concat", "learned")}  # fmt: skip
    fuser = init_fuser(FuserConfig(num_layers=local.fns.num_layers, num_agents=k, mode="learned"))
    all_agents = graph(k, list(range(k)))

    settings = SETTINGS if args.settings is None else [SETTINGS[i][:4] + (("concat",),) for i in args.settings]
    conditions = ["no agents"]
    for name, _, _, _, fusions in settings:
        conditions.append(f"oracle | {name}")
        conditions += [f"all agents, {f} | {name}" for f in fusions]
    values = {c: {"logprob": [], "margin": []} for c in conditions}
    crop_check = None
    started = time.perf_counter()
    with _common.progress() as bar, torch.no_grad():
        task = bar.add_task("worlds", total=len(items), status="")
        for w, item in enumerate(items):
            nodes = [(0, j) for j in range(k)]
            outs = dict(zip(nodes, comm["concat"].think([(item, all_agents, {}, n) for n in nodes])))
            if w == 0:
                two = LatentCaches("routing", local, roles, latent_steps=2, latent_only=False, sink_positions=0, fusion="concat")
                shorts = two.think([(item, all_agents, {}, n) for n in nodes])
                cuts = [crop(outs[n].cache, MAX_STEPS - 2) for n in nodes]
                crop_check = {
                    "max_abs_diff": max(float(torch.cat([(s.cache.keys - c.keys).abs().flatten(),
                                                         (s.cache.values - c.values).abs().flatten()]).max())
                                        for s, c in zip(shorts, cuts)),
                    "same_positions": all(torch.equal(s.cache.next_pos, c.next_pos) for s, c in zip(shorts, cuts)),
                }  # fmt: skip
            oracle = graph(k, [item.meta["informed"]])
            contexts = {"no agents": comm["concat"].context(item, all_agents, {}, DECISION)}
            for name, latent_only, steps, sinks, fusions in settings:
                passed = {n: o._replace(cache=passed_on(o.cache, latent_only, steps, sinks)) for n, o in outs.items()}
                contexts[f"oracle | {name}"] = comm["concat"].context(item, oracle, passed, DECISION)
                for f in fusions:
                    contexts[f"all agents, {f} | {name}"] = comm[f].context(
                        item, all_agents, passed, DECISION, fuser if f == "learned" else None
                    )  # fmt: skip
            names = list(contexts)
            for start in range(0, len(names), 4):  # 4 contexts x (1 + distractors) rows a forward
                chunk = names[start : start + 4]
                lps, margins = answer_scores(
                    local, [contexts[c].conversation for c in chunk], [contexts[c].cache for c in chunk], [item] * len(chunk)
                )  # fmt: skip
                for c, lp, m in zip(chunk, lps.tolist(), margins):
                    values[c]["logprob"].append(lp)
                    values[c]["margin"].append(m)
            bar.update(task, advance=1, status=f"{time.perf_counter() - started:.0f} s")
            print(f"world {w + 1}/{len(items)}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)

    rows = []
    for c in conditions:
        row = {"condition": c}
        for measure in ("logprob", "margin"):
            row[measure] = mean_ci(values[c][measure]).as_dict()
            oracle_key = "oracle | " + c.split(" | ")[1] if " | " in c else None
            if c.startswith("all agents") and oracle_key:
                row[f"oracle_minus_this_{measure}"] = paired_diff_ci(values[oracle_key][measure], values[c][measure]).as_dict()
            if c != "no agents":
                row[f"this_minus_no_agents_{measure}"] = paired_diff_ci(values[c][measure], values["no agents"][measure]).as_dict()
        rows.append(row)
    suffix = "" if args.variant == "topics" else f"_{args.variant}"
    report = {
        **_common.report_header(local, argparse.Namespace(smoke=args.smoke, stop_at_answer=True), machine, load_before),
        "variant": args.variant, "agents": k, "worlds": len(items), "seed": args.seed, "max_steps": MAX_STEPS,
        "seconds": round(time.perf_counter() - started, 1), "crop_check": crop_check,
        "command": " ".join(["python", "benchmarks/routing_carry.py", *sys.argv[1:]]),
        "rows": rows, "values": values,
    }  # fmt: skip
    out = args.out if not args.smoke else Path("/tmp/gcache_benchmarks_smoke")
    _common.write_json(out / f"routing_carry{suffix}.json", report)
    (out / f"routing_carry{suffix}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def _ci(d: dict) -> str:
    return f"{d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"


def markdown(report: dict) -> str:
    lines = [
        f"Routing `{report['variant']}`, {report['agents']} agents, {report['worlds']} worlds, {report['model']} "
        f"{report['dtype']}; mean over worlds [95% bootstrap CI]; oracle minus all agents: paired.",
        "",
        "| graph | communication | answer log-prob | margin | oracle minus this: log-prob | margin |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        graph_name, _, setting = r["condition"].partition(" | ")
        diff = [_ci(r[f"oracle_minus_this_{m}"]) if f"oracle_minus_this_{m}" in r else "" for m in ("logprob", "margin")]
        lines.append(f"| {graph_name} | {setting or '-'} | {_ci(r['logprob'])} | {_ci(r['margin'])} | {diff[0]} | {diff[1]} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
