"""Learning that must show on the embedded model when one agent carries the answer.

The setup, fixed before training:

- Three agents on the ``mesh`` topology: the policy moves the candidate edges 0->1, 0->2 and
  1->2 (every forward pair; agent 2 has no successor, so it is always a sink). Full caches
  (``--full-cache``: a latent-only cache does not carry a number its agent read, see the
  README), so the decision node reads the sinks' caches, fused by the learned fuser.
- Agent 0's role says the answer is 42; agents 1 and 2 say 17 and 93. Every question, train
  and held-out, is built from one template and has the reference answer 42.
- ``--reward likelihood`` (no decoding), learned fusion, 2 latent steps, batches of 4.

What carries the answer on this model, measured before writing the assertions (untrained
fusion, every one of the 8 graphs, 6 questions; mean answer log-probability): the answer
survives only in agent 0's own cache, read directly or at the start of a sink's cache; content
accumulated behind a distractor is lost (chain 0->1->2: -2.63, no edge: -2.63, all three
edges: -2.69, the best graph 0->1 + 0->2: -2.30, 0->2 alone: -2.39). Asserted, for each of 3
seeds within STEPS training steps:

- the fuser's source weight for agent 0 becomes the largest of the three;
- the mean answer log-probability on held-out questions rises (measured: +0.08, +0.20 and,
  after 8 steps, +0.37 for seeds 1, 2, 0).

Not asserted on the mesh: the edges. There the policy also moves 1->2, which carries a
distractor's cache, and the graphs it ranks are not ordered edge by edge (all three edges:
-2.69, worse than none), so 6-8 steps do not move the edges the same way for every seed
(seed 0: 0->1 and 0->2 fell for five steps, then rose back to about their start by step 8).

The edges are asserted on the ``star`` topology, which lets the policy move exactly the two
edges out of the informed agent, 0->1 and 0->2 (the hub is agent 0), and nothing else. With
full caches the decision node reads the sinks, so an edge out of agent 0 puts its cache at
the start of a sink's cache. Those four graphs, from the same measurement: no edge -2.63 (the
decision node reads agent 0 beside both distractors), 0->1 -2.39, 0->2 -2.39, both -2.30: each
edge that carries agent 0's cache toward the decision node helps. Asserted, for each of 3
seeds within STAR_STEPS steps: both edges' probabilities rise by at least 0.15 and end above
0.65 (measured at 6 steps: 0.566/0.632 -> 0.815/0.824, 0.388/0.355 -> 0.729/0.754 and
0.333/0.330 -> 0.81/0.80 for seeds 0, 1, 2), and the held-out answer log-probability does
not fall.
"""

from __future__ import annotations

import statistics

import pytest
import torch

from gcache.io.config import build_config
from gcache.io.pipeline import build_pipeline
from gcache.io.prompts import Role
from gcache.io.tasks import Item

pytestmark = pytest.mark.slow

STEPS = 6
STAR_STEPS = 6
BATCH = 4
ROLES = [
    Role("Informed Solver", "Informed Solver: has been told the answer.",
         "You are the Informed Solver. You have been told the answer to this question: the answer is 42."),
    Role("Guesser", "Guesser: guesses quickly.", "You are the Guesser. You guess that the answer is 17."),
    Role("Estimator", "Estimator: estimates roughly.", "You are the Estimator. You estimate that the answer is 93."),
]
NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lea", "Max", "Nia",
         "Oto", "Pia", "Quin", "Rita", "Sam", "Tess"]
THINGS = ["marbles", "apples", "stamps", "coins", "books"]


def question(i: int, split: str) -> Item:
    thing = THINGS[i % len(THINGS)]
    text = f"{NAMES[i % len(NAMES)]} counted the {thing} in a box. How many {thing} are in the box?"
    return Item(id=f"controlled/{split}/{i}", task="gsm8k", index=i, question=text, gold="42", meta={})


TRAIN = [question(i, "train") for i in range(16)]  # batches cycle through them
HELD_OUT = [question(i, "test") for i in range(16, 20)]


def controlled_pipeline(topology: str, seed: int):
    """The setup above on ``topology``: three agents, full caches, likelihood reward, 2 latent steps."""
    config = build_config({
        "task": "gsm8k", "method": "gcache", "topology": topology, "num_agents": 3, "latent_only": False,
        "reward": "likelihood", "latent_steps": 2, "batch_size": BATCH, "max_new_tokens": 1, "seed": seed,
    })  # fmt: skip
    return build_pipeline(config, roles=ROLES)


def held_out_logprob(pipeline) -> float:
    return statistics.mean(r["answer_logprob"] for r in pipeline.evaluate(HELD_OUT, decode=False))


def edge_probs(pipeline) -> dict[str, float]:
    """The policy's mean probability of each candidate edge over the held-out questions."""
    probs = torch.stack([
        pipeline.planner.plan(item, pipeline.learner.policy, train=False, seed=0).spatial_probs for item in HELD_OUT
    ]).mean(0)
    return {"0->1": float(probs[0, 1]), "0->2": float(probs[0, 2]), "1->2": float(probs[1, 2])}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_informed_agent_is_learned_on_the_embedded_model(seed):
    pipeline = controlled_pipeline("mesh", seed)
    before_logprob, before_edges = held_out_logprob(pipeline), edge_probs(pipeline)
    assert torch.equal(pipeline.learner.fuser.source_logits, torch.zeros(3))  # untrained: no agent preferred
    for step in range(STEPS):
        start = (step * BATCH) % len(TRAIN)
        records = pipeline.train_step(TRAIN[start : start + BATCH], step)
        assert all(r["error"] is None and r["tokens"]["generated"] == 0 for r in records)  # likelihood: no decoding
    after_logprob, after_edges = held_out_logprob(pipeline), edge_probs(pipeline)
    source = pipeline.learner.fuser.source_logits
    summary = (f"seed {seed}: log-prob {before_logprob:.3f} -> {after_logprob:.3f}, "
               f"edges {before_edges} -> {after_edges}, sources {source.tolist()}")
    assert int(source.argmax()) == 0, summary
    assert after_logprob > before_logprob + 0.05, summary


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_edges_out_of_the_informed_agent_move_toward_one_on_the_embedded_model(seed):
    pipeline = controlled_pipeline("star", seed)
    mask = pipeline.planner.plan(HELD_OUT[0], pipeline.learner.policy, train=False, seed=0).spatial_probs > 0
    assert mask.nonzero().tolist() == [[0, 1], [0, 2]]  # the only edges the policy can move
    before_logprob = held_out_logprob(pipeline)
    before = edge_probs(pipeline)
    for step in range(STAR_STEPS):
        start = (step * BATCH) % len(TRAIN)
        pipeline.train_step(TRAIN[start : start + BATCH], step)
    after, after_logprob = edge_probs(pipeline), held_out_logprob(pipeline)
    summary = f"seed {seed}: edges {before} -> {after}, log-prob {before_logprob:.3f} -> {after_logprob:.3f}"
    for edge in ("0->1", "0->2"):
        assert after[edge] >= before[edge] + 0.15 and after[edge] > 0.65, summary
    assert after_logprob >= before_logprob - 0.02, summary
