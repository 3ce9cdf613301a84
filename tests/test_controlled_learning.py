"""Learning that must show on the embedded model when one agent carries the answer.

The setup (tests/_controlled.py, fixed before training): three agents, one of them told the
answer (42), the other two stating wrong numbers (17, 93); every question, train and held-out,
has the reference answer 42. Full caches (``--full-cache``: a latent-only cache does not carry
a number its agent read, see the README), ``--reward likelihood`` (no decoding), learned
fusion, 2 latent steps, batches of 4, 6 training steps. Seed s puts the informed agent in slot
s % 3, so no claim rests on where it sits.

The seed study (benchmarks/controlled_seeds.py; results in
benchmarks/results/controlled_seeds.json): seeds 0-19 on each topology, so every slot gets 6-7
seeds. How often each claim held, and what the tests assert from it:

======================================================  ======  ==============================
claim after 6 steps                                     held    asserted here
======================================================  ======  ==============================
mesh and star: the fuser's largest source weight is     40/40   for every seed run (mesh 0-2,
the informed agent's (smallest lead 0.144)                      star 3-4)
star (hub agent 0): both edges out of the hub rise by   20/20   rise >= 0.15, end > 0.65
>= 0.15 and end > 0.65 (smallest rise 0.208, lowest             (seeds 3, 4)
end 0.724)
star: the held-out answer log-probability does not      20/20   no fall > 0.05 (seeds 3, 4)
fall by more than 0.01 (worst -0.010)
mesh: the held-out answer log-probability rises by      17/20   not asserted per seed
more than 0.05, one seed                                        (fails: seed 3 +0.002, seed 12
                                                                -0.021, seed 16 -0.267)
mesh: the mean rise over three consecutive seeds (one   18/18   mean > 0.1 over seeds 0-2
per slot) exceeds 0.1 (smallest mean 0.220)                     windows
======================================================  ======  ==============================

What the mesh does not give: a held-out rise for every seed. With the informed agent in slot 0
the rises are small (+0.30, +0.00, +0.09, +0.05, -0.02, +0.08, +0.33); in slot 2, a sink
the decision node reads directly, they are large (+0.34 to +1.56). The mesh's policy also
moves 1->2, which carries a distractor's cache, so its edges are not asserted; the star lets
the policy move only the two edges out of the hub, and on this model every edge that puts a
cache at the start of a sink's cache helps (the star's edges rise whether the hub is informed
or not: it is more context, which is why the claim about routing lives in the fuser's source
weights here, and in the routing task of issue 24).
"""

from __future__ import annotations

import statistics

import pytest
import torch
from _controlled import HELD_OUT, controlled_pipeline, run

pytestmark = pytest.mark.slow

STEPS = 6
MESH_SEEDS = (0, 1, 2)  # one per slot: the mean claim covers every slot
STAR_SEEDS = (3, 4)


def _summary(result: dict) -> str:
    return (f"{result['topology']} seed {result['seed']} (informed slot {result['slot']}): log-prob "
            f"{result['before']['logprob']:.3f} -> {result['after']['logprob']:.3f}, edges "
            f"{result['before']['edges']} -> {result['after']['edges']}, sources {result['source_logits']}")


def _informed_is_preferred(result: dict) -> bool:
    sources = result["source_logits"]
    return max(range(len(sources)), key=sources.__getitem__) == result["slot"]


def test_the_fuser_learns_the_informed_agent_and_the_mesh_improves_on_average():
    results = [run("mesh", seed, seed % 3, STEPS) for seed in MESH_SEEDS]
    summary = "\n".join(_summary(r) for r in results)
    assert all(_informed_is_preferred(r) for r in results), summary
    rise = statistics.mean(r["after"]["logprob"] - r["before"]["logprob"] for r in results)
    assert rise > 0.1, f"mean held-out rise {rise:.3f}\n{summary}"


@pytest.mark.parametrize("seed", STAR_SEEDS)
def test_the_edges_out_of_the_hub_move_toward_one_on_the_star(seed):
    pipeline = controlled_pipeline("star", seed, seed % 3)
    mask = pipeline.planner.plan(HELD_OUT[0], train=False, seed=0).spatial_probs > 0
    assert mask.nonzero().tolist() == [[0, 1], [0, 2]]  # the only edges the policy can move
    assert torch.equal(pipeline.learner.fuser.source_logits, torch.zeros(3))  # untrained: no agent preferred
    result = run("star", seed, seed % 3, STEPS)
    summary = _summary(result)
    for edge in ("0->1", "0->2"):
        before, after = result["before"]["edges"][edge], result["after"]["edges"][edge]
        assert after >= before + 0.15 and after > 0.65, summary
    assert _informed_is_preferred(result), summary
    assert result["after"]["logprob"] >= result["before"]["logprob"] - 0.05, summary
