"""A ``Rollouts`` memo shared by runs on one model: a rollout is reused exactly when its
question, role, settings, inputs and fuser are those of one already done, and reusing it
changes no result."""

from __future__ import annotations

import pytest
import torch

from gcache.io.runner import pipeline as pipeline_module
from gcache.io.runner.communication import Rollouts
from gcache.io.runner.config import build_config
from gcache.io.runner.pipeline import build_pipeline, load_local
from gcache.io.tasks.datasets import load_items

FLAGS = dict(task="gsm8k", model="tiny-llama", method="gcache", num_agents=3, latent_steps=2, max_new_tokens=2,
             optimize_spatial=False, batch_size=2)


@pytest.fixture(scope="module")
def items():
    return load_items("gsm8k", "test", limit=2)


def _configs() -> dict:
    configs = {t: build_config({**FLAGS, "topology": t}) for t in ("chain", "star", "mesh")}
    configs["mesh weighted"] = build_config({**FLAGS, "topology": "mesh", "fusion": "weighted"})
    return configs


@pytest.fixture(scope="module")
def local():
    return load_local(_configs()["chain"])


def _pipelines(local, memo: Rollouts | None) -> dict:
    """chain, star and mesh of the same three agents, plus mesh with weighted fusion, on one model,
    sharing ``memo`` (given at build, as benchmarks do)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline_module, "load_local", lambda config: local)
        return {name: build_pipeline(c, rollouts=memo) for name, c in _configs().items()}


def _logprobs(pipeline, items) -> list[float]:
    return [r["answer_logprob"] for r in pipeline.evaluate(items, decode=False)]


def test_shared_rollouts_change_no_result_and_are_reused_where_inputs_agree(local, items):
    names = ("chain", "star", "mesh")
    alone_pipelines = _pipelines(local, None)
    alone = {n: _logprobs(alone_pipelines[n], items) for n in names}
    memo = Rollouts()
    pipelines = _pipelines(local, memo)
    shared = {n: _logprobs(pipelines[n], items) for n in names}
    for n in names:
        assert shared[n] == pytest.approx(alone[n], abs=1e-5), n
    # Per question, agents (0, 1, 2) in chain 0->1->2, star 0->{1,2}, mesh 0->1->2 + 0->2: the distinct
    # rollouts are a0, a1(a0), a2(a1), a2(a0), a2(a0, a1): 5 of 9 rows, the other 4 reused.
    assert (memo.misses, memo.hits) == (5 * len(items), 4 * len(items))
    assert len(memo.done) == 5 * len(items)
    memo.clear()
    assert not memo.done


def test_other_settings_or_another_fuser_miss(local, items):
    memo = Rollouts()
    pipelines = _pipelines(local, memo)
    _logprobs(pipelines["mesh"], items[:1])
    _logprobs(pipelines["mesh weighted"], items[:1])  # another fusion: only the first agent (no inputs) is shared
    assert (memo.misses, memo.hits) == (5, 1)
    mesh = pipelines["mesh"]
    learner = mesh.learner
    before = learner.state
    fuser = learner.fuser
    learner.state = before._replace(params={**before.params, "fuser": fuser._replace(source_logits=fuser.source_logits + 1.0)})
    try:
        _logprobs(mesh, items[:1])  # another fuser: agents with inputs think again
    finally:
        learner.state = before
    assert (memo.misses, memo.hits) == (7, 2)
    _logprobs(mesh, items[:1])  # the original fuser's rollouts are still there
    assert (memo.misses, memo.hits) == (7, 5)


def test_other_edge_weights_miss(local, items):
    """The policy's edge probabilities weigh the fusion: the same graph with other weights thinks again."""
    memo = Rollouts()
    mesh = _pipelines(local, memo)["mesh"]
    topology, sched = mesh.planner._plan
    halved = sched._replace(inputs={n: tuple(e._replace(weight=0.5) for e in edges) for n, edges in sched.inputs.items()})
    _logprobs(mesh, items[:1])
    mesh.planner._plan = (topology, halved)
    _logprobs(mesh, items[:1])
    assert (memo.misses, memo.hits) == (5, 1)


def test_without_a_memo_nothing_is_kept(local, items):
    chain = _pipelines(local, None)["chain"]
    out = chain.evaluate(items[:1], decode=False)[0]
    assert out["answer_logprob"] is not None and torch.isfinite(torch.tensor(out["answer_logprob"]))
    assert chain.comm.rollouts is None
