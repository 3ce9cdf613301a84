"""The routing task (gcache.io.tasks.routing): its generated worlds, the contrastive margin against a plain
transformers forward, `gcache run routing` end to end, and one clear line per bad routing option."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from gcache_cli.main import app
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_answers import reference_logprob
from typer.testing import CliRunner

import gcache.io.runner.pipeline as pipeline_module
from gcache.core.cache import latent_part, select_rows, trim_padding
from gcache.core.graph import DECISION, schedule
from gcache.core.latent import rollout
from gcache.core.policy import init_policy
from gcache.core.rewards import reward
from gcache.core.topology import Topology, TopologyConfig
from gcache.io.models.local import encode_chat, tiny_model
from gcache.io.records.runlog import read_records
from gcache.io.runner.answers import answer_target
from gcache.io.runner.communication import LatentCaches
from gcache.io.runner.config import build_config
from gcache.io.runner.experiment import run_experiment
from gcache.io.runner.margin import answer_scores
from gcache.io.runner.pipeline import build_pipeline
from gcache.io.runner.planner import Plan
from gcache.io.runner.prompts import agent_messages, agent_roles, decision_messages
from gcache.io.tasks.datasets import load_items as load_task_items
from gcache.io.tasks.routing import MAX_AGENTS, SPLIT_SIZE, VARIANTS, RoutingOptions, load_items, world
from gcache.io.tasks.scoring import score

STATED = re.compile(r"When asked how many (\w+) there are, the answer is (\d+)\.")


def stated(item):
    """(topic, number) each agent's instruction states, by slot."""
    return [STATED.search(r.instruction).groups() for r in item.meta["roles"]]


@settings(max_examples=60, deadline=None)
@given(
    k=st.integers(2, 8), variant=st.sampled_from(VARIANTS), seed=st.integers(0, 10**6),
    index=st.integers(0, SPLIT_SIZE - 1), split=st.sampled_from(["train", "test"]),
)  # fmt: skip
def test_a_world_has_exactly_one_informed_agent_whose_number_is_the_gold_answer(k, variant, seed, index, split):
    options = RoutingOptions(variant, k)
    item = world(split, index, seed=seed, options=options)
    meta = item.meta
    said = stated(item)
    assert len(meta["roles"]) == k
    topic = meta["topic"]
    assert item.question == f"How many {topic} are there?"
    informed = [j for j, (t, n) in enumerate(said) if t == topic and n == item.gold]
    assert informed == [meta["informed"]], "exactly one agent states the asked topic's number"
    keeper = meta["roles"][meta["informed"]]
    assert topic.capitalize() in keeper.name and topic in keeper.profile, "its role and profile name the topic"
    assert sorted(meta["distractors"]) == sorted(n for j, (t, n) in enumerate(said) if j != meta["informed"])
    assert item.gold not in meta["distractors"] and len(set(meta["distractors"])) == k - 1
    if variant == "unreliable":
        liar = meta["liar"]
        assert liar != meta["informed"] and said[liar][0] == topic, "the rumor claims the asked topic"
        assert "usually wrong" in meta["roles"][liar].profile
        topics = [t for j, (t, _) in enumerate(said) if j != liar]
    else:
        assert meta["liar"] is None
        topics = [t for t, _ in said]
    assert len(set(topics)) == len(topics), "one keeper per topic"
    assert world(split, index, seed=seed, options=options) == item and stated(world(split, index, seed=seed, options=options)) == said
    assert score(item, f"#### {item.gold}").correct and not score(item, f"#### {meta['distractors'][0]}").correct


def test_a_seed_reproduces_its_questions_and_the_informed_slot_moves():
    a = load_task_items("routing", "test", limit=40, seed=3)
    b = load_task_items("routing", "test", limit=40, seed=3)
    assert [(i.question, i.gold, i.meta["roles"]) for i in a] == [(i.question, i.gold, i.meta["roles"]) for i in b]
    assert [i.gold for i in load_task_items("routing", "test", limit=40, seed=4)] != [i.gold for i in a]
    assert {i.meta["informed"] for i in a} == {0, 1, 2, 3}
    train = load_task_items("routing", "train", limit=40, seed=3)
    assert {i.meta["roles"] for i in train}.isdisjoint({i.meta["roles"] for i in a})
    assert load_items("test", question_id="routing/topics/test/7", seed=3) == [a[7]]
    assert answer_target(a[0]).prefix == "#### "


@pytest.mark.parametrize("bad, match", [
    (dict(variant="liars"), "--routing-variant: expected one of topics, unreliable"),
    (dict(num_agents=1), "--agent-nums: a routing world needs 2 to"),
    (dict(num_agents=MAX_AGENTS + 1), "--agent-nums"),
])  # fmt: skip
def test_bad_options_are_refused_naming_them(bad, match):
    with pytest.raises(ValueError, match=match):
        RoutingOptions(**bad)
    with pytest.raises(ValueError, match="routing options apply to the routing task"):
        load_task_items("gsm8k", "test", limit=1, routing=RoutingOptions())
    with pytest.raises(ValueError, match="question_id"):
        load_items("test", question_id=SPLIT_SIZE)


# --------------------------------------------------------------------------- the margin


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama", seed=0)


def test_the_margin_equals_a_plain_transformers_forward_on_text_and_cache_contexts(tiny):
    items = load_items("test", limit=2, options=RoutingOptions("unreliable", 3)) + load_items("test", limit=1)
    # A cache per row: an agent's rollout (latent-only for the first row), none for the last.
    convs = [agent_messages(it.task, it.meta["roles"][0], it.question, latent=True) for it in items]
    ids, mask = encode_chat(tiny, convs)
    out = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=2).cache
    caches = [trim_padding(select_rows(out, [b])) for b in range(len(items))]
    caches[0], caches[2] = latent_part(caches[0], 2, 4), None
    decisions = [decision_messages(it.task, it.question, latent=c is not None) for it, c in zip(items, caches)]
    with torch.no_grad():
        gold, margins = answer_scores(tiny, decisions, caches, items)
    for b, (conv, item, cache) in enumerate(zip(decisions, items, caches)):
        ref = {a: reference_logprob(tiny, conv, _with_gold(item, a), cache) for a in (item.gold, *item.meta["distractors"])}
        assert math.isclose(float(gold[b]), ref[item.gold], abs_tol=1e-4), b
        want = ref[item.gold] - max(v for a, v in ref.items() if a != item.gold)
        assert math.isclose(margins[b], want, abs_tol=1e-4), b


def _with_gold(item, answer):
    from dataclasses import replace

    return replace(item, gold=answer)


def test_items_without_distractors_get_no_margin_and_the_same_logprob(tiny):
    from gcache.io.runner.answers import answer_logprobs
    from gcache.io.tasks.datasets import Item

    items = [Item("gsm8k/x", "gsm8k", 0, "What is 6 times 7?", "42")]
    convs = [decision_messages("gsm8k", items[0].question)]
    with torch.no_grad():
        gold, margins = answer_scores(tiny, convs, [None], items)
        assert margins == [None]
        assert torch.equal(gold, answer_logprobs(tiny, convs, [None], items))


def test_each_agent_reads_its_own_worlds_role(tiny):
    item = load_items("test", limit=1)[0]
    comm = LatentCaches("routing", tiny, agent_roles("routing", n=4), latent_steps=1, latent_only=False,
                        sink_positions=0, fusion="concat")  # fmt: skip
    from gcache.core.graph import schedule
    from gcache.core.sampling import fixed_topology
    from gcache.core.topology import TopologyConfig, spatial_mask

    config = TopologyConfig(num_agents=4, mode="chain", optimize_spatial=False, optimize_temporal=False)
    sched = schedule(fixed_topology(spatial_mask("chain", 4), config), 1)
    for j, role in enumerate(item.meta["roles"]):
        system = comm.context(item, sched, {}, (0, j)).conversation[0]["content"]
        assert system.startswith(role.instruction)


# --------------------------------------------------------------------------- `gcache run routing`

TINY = ["--model", "tiny-llama", "--max-new-tokens", "6", "--latent-steps", "2", "--batch-size", "2"]


@pytest.mark.parametrize("extra", [[], ["--routing-variant", "unreliable", "--reward", "likelihood"]])
def test_gcache_run_routing_works_and_records_the_margin(tmp_path, extra):
    out = tmp_path / "run"
    args = ["run", "routing", "--limit", "4", "--train-size", "2", "--num-iterations", "1", *TINY, *extra, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = read_records(out / "results.jsonl")
    assert [r["phase"] for r in records] == ["train"] * 2 + ["eval"] * 4
    for r in records:
        assert r["error"] is None and math.isfinite(r["margin"]) and math.isfinite(r["answer_logprob"])
        # The agents run are those with a path to the decision node (live_nodes): its inputs among them.
        run = {f"{t['node'].split(':a')[1]}:{t['role']}" for t in r["trace"] if t["node"] != "decision"}
        assert 1 <= len(run) <= 4 and set(r["decision_inputs"]) <= run
        assert all(name.endswith("Keeper") or "Rumor" in name for name in run), run
    train = [r for r in records if r["phase"] == "train"]
    if not extra:  # the routing default: the margin is the reward, nothing is decoded to train
        assert all(r["reward"] == pytest.approx(r["margin"]) and r["tokens"]["generated"] == 0 for r in train)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 4 and summary["margin"]["n"] == 4
    assert summary["config"]["routing_variant"] == ("unreliable" if extra else "topics")


def test_a_run_that_learns_its_decision_inputs_records_them_and_trains_them(tmp_path):
    """--learn-decision-inputs: every record names a non-empty set of decision inputs, the ones its
    graph fed the judger, and the training step moves the policy's decision head."""
    out = tmp_path / "run"
    args = ["run", "routing", "--routing-variant", "unreliable", "--limit", "4", "--train-size", "4",
            "--num-iterations", "2", "--learn-decision-inputs", *TINY, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = read_records(out / "results.jsonl")
    for r in records:
        assert r["error"] is None and math.isfinite(r["log_prob"]) and math.isfinite(r["margin"])
        assert 1 <= len(r["decision_inputs"]) <= 4
    params = load_file(out / "params.safetensors")
    initial = init_policy(TopologyConfig(num_agents=4), params["policy.gcn_weight_1"].shape[0],
                          torch.Generator().manual_seed(0))
    assert not torch.equal(params["policy.decision_head"], initial.decision_head)
    assert float(params["policy.decision_similarity"]) != 0.0
    assert json.loads((out / "summary.json").read_text())["config"]["learn_decision_inputs"] is True


@pytest.mark.parametrize("task, kind", [("routing", "margin"), ("gsm8k", "likelihood")])
def test_an_edge_cost_is_charged_on_each_train_reward_per_edge_the_graph_took(tmp_path, task, kind):
    """--edge-cost c: a train record's reward is its task reward minus c times the edges between
    agents its sampled graph took (on GSM8K the likelihood is then measured by the pipeline, not
    the learner's forward, which knows no cost); eval records are not charged."""
    cost = 0.25
    out = tmp_path / "run"
    args = ["run", task, "--limit", "2", "--train-size", "4", "--num-iterations", "2", "--edge-cost", str(cost),
            "--reward", kind, *TINY, "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    records = read_records(out / "results.jsonl")
    train = [r for r in records if r["phase"] == "train"]
    assert len(train) == 4 and all(r["error"] is None for r in train)
    taken = [sum(e["taken"] for e in r["edges"] if e["src"] != e["dst"]) for r in train]
    assert len(set(taken)) > 1 or taken[0] > 0  # the charge is seen on graphs that took edges
    for r, edges in zip(train, taken):
        task_reward = reward(kind, None, r["answer_logprob"], margin=r["margin"])
        assert r["reward"] == pytest.approx(task_reward - cost * edges, abs=1e-6)
    assert json.loads((out / "summary.json").read_text())["config"]["edge_cost"] == cost


class _InformedOnly:
    """A planner whose graph has no edge and feeds the decision node from the informed agent alone."""

    def plan(self, item, params=None, *, train=False, seed=0):
        n = len(item.meta["roles"])
        inputs = torch.zeros(n, dtype=torch.bool)
        inputs[item.meta["informed"]] = True
        none = torch.zeros(n, n, dtype=torch.bool)
        topology = Topology(none, none.clone(), torch.arange(n), inputs, torch.zeros(()))
        return Plan(item, topology, schedule(topology, 1), None, None, None)


@pytest.mark.parametrize("method, extra", [("gcache", {"latent_steps": 2}), ("text-mas", {})])
def test_agents_with_no_path_to_the_decision_are_not_run_and_change_no_answer(monkeypatch, method, extra):
    """The pipeline runs only live_nodes: on a graph that reads the informed agent alone, the other
    three agents leave the trace and their prompt tokens go, while the answer, its log-probability
    and the margin equal those of running every agent (live_nodes replaced by all nodes)."""
    config = build_config({"task": "routing", "method": method, "model": "tiny-llama", "max_new_tokens": 4,
                           "num_iterations": 0, **extra})  # fmt: skip
    items = load_items("test", limit=2, seed=3, options=RoutingOptions("topics", 4))

    def answered():
        pipeline = build_pipeline(config)
        pipeline.planner = _InformedOnly()
        return pipeline.evaluate(items)

    pruned = answered()
    monkeypatch.setattr(pipeline_module, "live_nodes", lambda sched, answering=(): frozenset(sched.inputs) - {DECISION})
    everyone = answered()
    for a, b, item in zip(pruned, everyone, items):
        assert [t["node"] for t in a["trace"]] == [f"r0:a{item.meta['informed']}", "decision"]
        assert len(b["trace"]) == 5
        assert a["answer"] == b["answer"] and a["prediction"] == b["prediction"]
        # float32 rounding depends on the batch's rows (fewer agents run alongside): 1e-4, not exact.
        assert a["margin"] == pytest.approx(b["margin"], abs=1e-4)
        assert a["answer_logprob"] == pytest.approx(b["answer_logprob"], abs=1e-4)
        assert a["tokens"]["prompt"] < b["tokens"]["prompt"]


BAD_ROUTING = [
    (["gsm8k", "--method", "latent-mas", "--learn-decision-inputs"],
     "--learn-decision-inputs does not apply to --method latent-mas"),
    (["routing", "--routing-variant", "liars"], "--routing-variant: expected one of topics, unreliable, got 'liars'"),
    (["routing", "--agent-nums", "1"], "--agent-nums: a routing world needs 2 to"),
    (["routing", "--agent-nums", "17"], "--agent-nums: a routing world needs 2 to"),
    (["routing", "--method", "single"], "--method single: a routing world needs at least 2 agents"),
    (["gsm8k", "--routing-variant", "topics"], "--routing-variant applies to the routing task, not gsm8k"),
    (["gsm8k", "--reward", "margin"], "--reward margin contrasts the gold answer"),
    (["routing", "--edge-cost", "-0.1"], "--edge-cost: expected a finite value >= 0, got -0.1"),
    (["routing", "--edge-cost", "nan"], "--edge-cost: expected a finite value >= 0, got nan"),
    (["routing", "--method", "latent-mas", "--edge-cost", "0.1"], "--edge-cost does not apply to --method latent-mas"),
    (["gsm8k", "--no-optimize-spatial", "--edge-cost", "0.1"], "--edge-cost charges the edges a policy samples"),
]


@pytest.mark.parametrize("args, message", BAD_ROUTING)
def test_bad_routing_options_fail_with_one_clear_line(tmp_path, args, message):
    result = CliRunner().invoke(app, ["run", *args, "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()


def test_the_routing_default_reward_is_the_margin_unless_asked():
    assert build_config({"task": "routing"}).reward == "margin"
    assert build_config({"task": "routing", "reward": "likelihood"}).reward == "likelihood"
    assert build_config({"task": "gsm8k"}).reward == "likelihood"


def test_gcache_learns_its_decision_inputs_on_routing_unless_asked_not_to():
    assert build_config({"task": "routing"}).learn_decision_inputs is True
    assert build_config({"task": "routing", "learn_decision_inputs": False}).learn_decision_inputs is False
    assert build_config({"task": "routing", "method": "latent-mas"}).learn_decision_inputs is False
    assert build_config({"task": "gsm8k"}).learn_decision_inputs is False
