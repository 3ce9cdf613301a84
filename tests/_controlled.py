"""The controlled learning setup (tests/test_controlled_learning.py) as functions, so that the
seed study (benchmarks/controlled_seeds.py) runs exactly what the tests assert on.

Three agents, one of them told the answer (42), the other two stating wrong numbers (17, 93);
``slot`` says which agent id the informed role takes, the distractors fill the other slots in
order. Every question has the reference answer 42. Full caches, likelihood reward, learned
fusion, 2 latent steps, batches of 4.
"""

from __future__ import annotations

import statistics

import torch

from gcache.io.runner.config import build_config
from gcache.io.runner.pipeline import build_pipeline
from gcache.io.runner.prompts import Role
from gcache.io.tasks.datasets import Item

BATCH = 4
INFORMED = Role("Informed Solver", "Informed Solver: has been told the answer.",
                "You are the Informed Solver. You have been told the answer to this question: the answer is 42.")
DISTRACTORS = (
    Role("Guesser", "Guesser: guesses quickly.", "You are the Guesser. You guess that the answer is 17."),
    Role("Estimator", "Estimator: estimates roughly.", "You are the Estimator. You estimate that the answer is 93."),
)
NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lea", "Max", "Nia",
         "Oto", "Pia", "Quin", "Rita", "Sam", "Tess"]
THINGS = ["marbles", "apples", "stamps", "coins", "books"]


def question(i: int, split: str) -> Item:
    thing = THINGS[i % len(THINGS)]
    text = f"{NAMES[i % len(NAMES)]} counted the {thing} in a box. How many {thing} are in the box?"
    return Item(id=f"controlled/{split}/{i}", task="gsm8k", index=i, question=text, gold="42", meta={})


TRAIN = [question(i, "train") for i in range(16)]  # batches cycle through them
HELD_OUT = [question(i, "test") for i in range(16, 20)]


def roles(slot: int) -> list[Role]:
    """The three roles with the informed one at agent id ``slot``."""
    if slot not in (0, 1, 2):
        raise ValueError(f"slot: expected 0, 1 or 2, got {slot!r}")
    out = list(DISTRACTORS)
    out.insert(slot, INFORMED)
    return out


def controlled_pipeline(topology: str, seed: int, slot: int = 0):
    """The setup above on ``topology``: three agents, full caches, likelihood reward, 2 latent steps."""
    config = build_config({
        "task": "gsm8k", "method": "gcache", "topology": topology, "num_agents": 3, "latent_only": False,
        "reward": "likelihood", "latent_steps": 2, "batch_size": BATCH, "max_new_tokens": 1, "seed": seed,
    })  # fmt: skip
    return build_pipeline(config, roles=roles(slot))


def held_out_logprob(pipeline) -> float:
    return statistics.mean(r["answer_logprob"] for r in pipeline.evaluate(HELD_OUT, decode=False))


def edge_probs(pipeline) -> dict[str, float]:
    """The policy's mean probability of each candidate edge (p > 0) over the held-out questions."""
    probs = torch.stack([
        pipeline.planner.plan(item, train=False, seed=0).spatial_probs for item in HELD_OUT
    ]).mean(0)
    return {f"{i}->{j}": float(probs[i, j]) for i, j in (probs > 0).nonzero().tolist()}


def train(pipeline, steps: int) -> list[float]:
    """``steps`` training steps over TRAIN in batches of BATCH; the mean reward of each step."""
    rewards = []
    for step in range(steps):
        start = (step * BATCH) % len(TRAIN)
        records = pipeline.train_step(TRAIN[start : start + BATCH], step)
        assert all(r["error"] is None and r["tokens"]["generated"] == 0 for r in records)  # likelihood: no decoding
        rewards.append(statistics.mean(r["reward"] for r in records))
    return rewards


def run(topology: str, seed: int, slot: int, steps: int) -> dict:
    """One controlled run: held-out answer log-probability and edge probabilities before and after
    ``steps`` steps, the fuser's source logits after, and each step's mean reward."""
    pipeline = controlled_pipeline(topology, seed, slot)
    before = {"logprob": held_out_logprob(pipeline), "edges": edge_probs(pipeline)}
    rewards = train(pipeline, steps)
    after = {"logprob": held_out_logprob(pipeline), "edges": edge_probs(pipeline)}
    return {"topology": topology, "seed": seed, "slot": slot, "steps": steps, "before": before, "after": after,
            "source_logits": pipeline.learner.fuser.source_logits.tolist(), "rewards": rewards}  # fmt: skip
