"""`gcache inspect`: a latent run's questions rerun from its folder, read as tokens, fusion weights and attention."""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr

import pytest
import torch
from _controlled import DISTRACTORS, INFORMED, question
from rich.console import Console
from typer.testing import CliRunner

import gcache
from gcache.io.records.runlog import read_records
from gcache.io.runner.config import build_config
from gcache.io.runner.experiment import run_experiment
from gcache.io.runner.inspection import PROMPT, attention_weights, inspect_questions, inspect_run, load_config
from gcache.io.runner.pipeline import build_pipeline
from gcache.io.tasks.datasets import load_items
from gcache_cli.main import app

LATENT_STEPS, TOP_K = 2, 3
COMMON = {"task": "gsm8k", "model": "tiny-llama", "max_new_tokens": 6, "latent_steps": LATENT_STEPS, "limit": 2, "batch_size": 2}


def _run(folder, flags: dict):
    with redirect_stderr(io.StringIO()):
        run_experiment(build_config({**COMMON, **flags, "out": str(folder)}), console=Console(file=io.StringIO()))
    return folder


@pytest.fixture(scope="module")
def gcache_run(tmp_path_factory):
    """gcache after one training step: a learned graph, learned fusion, latent-only caches."""
    flags = {"method": "gcache", "num_agents": 3, "train_size": 2, "num_iterations": 1, "latent_only": True}
    return _run(tmp_path_factory.mktemp("gcache"), flags)


@pytest.fixture(scope="module")
def chain_run(tmp_path_factory):
    """latent-mas: full caches passed along planner -> critic -> refiner, concatenated."""
    return _run(tmp_path_factory.mktemp("lmas"), {"method": "latent-mas"})


@pytest.fixture(scope="module")
def inspected(gcache_run, chain_run):
    return {
        "gcache": inspect_run(gcache_run, ["0", "gsm8k/test/1"], top_k=TOP_K),
        "latent-mas": inspect_run(chain_run, ["0", "1"], top_k=TOP_K),
    }


def _eval_lines(run) -> dict:
    return {r["id"]: r for r in read_records(run / "results.jsonl") if r["phase"] == "eval"}


@pytest.mark.parametrize("method", ["gcache", "latent-mas"])
def test_the_rerun_answers_what_the_run_recorded(inspected, method):
    questions = inspected[method].questions
    assert [q.id for q in questions] == ["gsm8k/test/0", "gsm8k/test/1"]
    for q in questions:
        assert q.recorded is not None and q.answer == q.recorded


@pytest.mark.parametrize("method", ["gcache", "latent-mas"])
def test_every_thinking_agent_has_top_k_tokens_per_latent_step(inspected, method):
    lm = gcache.tiny_model()
    for q in inspected[method].questions:
        assert len(q.agents) == 3
        for agent in q.agents:
            assert [s.step for s in agent.steps] == list(range(1, LATENT_STEPS + 1))
            for s in agent.steps:
                assert len(s.head) == len(s.embedding) == TOP_K
                probs = [p for _, p in s.head]
                cosines = [c for _, c in s.embedding]
                assert probs == sorted(probs, reverse=True) and all(0.0 <= p <= 1.0 for p in probs)
                assert cosines == sorted(cosines, reverse=True) and all(-1.0 <= c <= 1.0 + 1e-6 for c in cosines)
                for token, _ in s.head + s.embedding:  # one vocabulary token each, decoded
                    assert isinstance(token, str) and token
                    assert len(lm.tokenizer(token, add_special_tokens=False)["input_ids"]) >= 1


@pytest.mark.parametrize("method", ["gcache", "latent-mas"])
def test_attention_parts_sum_to_one_per_layer(inspected, method):
    for q in inspected[method].questions:
        att = q.attention
        assert att.sources[-1] == PROMPT and len(att.sources) == 4
        assert len(att.per_layer) == 2  # the tiny model's layers
        for row in att.per_layer:
            assert len(row) == 4 and sum(row) == pytest.approx(1.0, abs=1e-5) and min(row) >= 0.0
        assert att.mean == pytest.approx([sum(c) / 2 for c in zip(*att.per_layer)], abs=1e-6)
        assert att.queries  # the positions that predict the gold number's tokens


def test_judger_attention_sums_to_one_over_all_positions_per_query_token(gcache_run):
    pipeline = build_pipeline(load_config(gcache_run))
    pipeline.load(gcache_run / "params.safetensors")
    item = load_items("gsm8k", "test", limit=1)[0]
    plan = pipeline.planner.plan(item, train=False, seed=0)
    out = pipeline._answer([plan], step=0)[0]
    weights, mask, queries = attention_weights(pipeline.comm.local, out.context, item)
    t = out.context.cache.seq_len
    assert weights.shape == (2, len(queries), weights.shape[-1]) and weights.shape[-1] > t
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]), atol=1e-5, rtol=0)
    assert mask.shape == (t,)


def test_a_concatenated_chain_attributes_each_position_to_the_agent_that_wrote_it(inspected, chain_run):
    """latent-mas passes full caches: the judger's cache is the planner's, critic's and refiner's
    prompt and latent positions, each counted once, exactly where they were written."""
    lines = _eval_lines(chain_run)
    for q in inspected["latent-mas"].questions:
        written = [t["tokens"]["prompt"] + t["tokens"]["latent"] for t in lines[q.id]["trace"] if t["node"] != "decision"]
        assert q.attention.attribution == "positions"
        assert q.attention.positions[:3] == written
        assert q.fusion == []  # one input at every node: nothing fused
        assert [e["dst"] for e in q.edges] == ["1:Critic", "2:Refiner", "decision"] and all(e["taken"] for e in q.edges)


def test_mixed_caches_are_attributed_by_the_fusion_coefficients(inspected, gcache_run):
    config = load_config(gcache_run)
    sink_and_latent = config.sink_positions + LATENT_STEPS
    for q in inspected["gcache"].questions:
        assert q.attention.attribution == "coefficients"
        # latent-only caches of 4 sink + 2 latent positions, mixed slot by slot: 6 positions in all
        assert sum(q.attention.positions[:3]) == pytest.approx(sink_and_latent, abs=1e-5)
        judged = [f for f in q.fusion if f.node == "decision"]
        assert len(judged) == 1 and len(judged[0].sources) == 3
        for f in q.fusion:
            assert f.mode == "learned" and len(f.gates) == 2
            assert sum(f.source_weights) == pytest.approx(1.0, abs=1e-6)
            for layer in zip(*f.coefficients):
                assert sum(layer) == pytest.approx(1.0, abs=1e-6)
        taken = [e for e in q.edges if e["taken"] and e["dst"] != "decision"]
        assert len(taken) == sum(len(a.inputs) for a in q.agents)  # every taken edge carried a cache


def test_a_text_method_is_refused_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(build_config({"method": "text-mas"}).to_dict()))
    with pytest.raises(ValueError, match="text-mas passes text between agents, not caches"):
        inspect_run(tmp_path)


def test_a_question_not_in_the_test_split_is_refused(chain_run):
    with pytest.raises(ValueError, match="question: expected a test question id"):
        inspect_run(chain_run, ["no-such-question"])


def test_cli_writes_inspect_json_and_png(chain_run, tmp_path):
    result = CliRunner().invoke(app, ["inspect", str(chain_run), "-q", "1", "--top-k", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "inspect.json").read_text())
    assert data["method"] == "latent-mas" and [q["id"] for q in data["questions"]] == ["gsm8k/test/1"]
    assert len(data["questions"][0]["agents"][0]["steps"][0]["head"]) == 2
    assert (tmp_path / "inspect.png").stat().st_size > 10_000
    assert "same as recorded" in result.output


def test_cli_says_a_text_method_in_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(build_config({"method": "single"}).to_dict()))
    result = CliRunner().invoke(app, ["inspect", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and "not caches" in result.output


def test_inspect_questions_refuses_a_text_pipeline():
    pipeline = build_pipeline(build_config({"method": "single", "model": "tiny-llama"}))
    with pytest.raises(ValueError, match="latent communication"):
        inspect_questions(pipeline, [])


@pytest.mark.slow
def test_the_judger_attends_more_to_the_agent_told_the_answer_than_to_a_distractor_in_its_place():
    """Embedded SmolLM2-135M, two agents in a chain passing full caches (concat), the judger reading
    the second one's cache (which holds the first's): one agent told "the answer is 42", the other
    guessing 17, in both orders. Measured (controlled/test/16, attention averaged over 30 layers and
    the query tokens ' ' and '4'): first in the chain, informed 0.423 against the guesser's 0.417;
    second, informed 0.101 against 0.083; the judger's own prompt about 0.49. Whichever agent comes
    first holds the sequence's first positions, the attention sink, and draws about 0.42 whatever it
    was told: the comparison is therefore made place by place, and on the mean of both orders."""
    config = build_config({
        "task": "gsm8k", "method": "gcache", "topology": "chain", "num_agents": 2, "latent_only": False,
        "fusion": "concat", "optimize_spatial": False, "latent_steps": 2, "max_new_tokens": 1,
    })  # fmt: skip
    mass = {}  # (role, place in the chain) -> mean attention mass
    for roles in ([INFORMED, DISTRACTORS[0]], [DISTRACTORS[0], INFORMED]):
        (q,) = inspect_questions(build_pipeline(config, roles=roles), [question(16, "test")])
        assert q.attention.attribution == "positions"
        for place, role in enumerate(roles):
            mass[role.name, place] = q.attention.mean[place]
    informed, guesser = INFORMED.name, DISTRACTORS[0].name
    assert mass[informed, 1] > mass[guesser, 1], mass
    assert mass[informed, 0] + mass[informed, 1] > mass[guesser, 0] + mass[guesser, 1], mass
