"""The execution schedule of a topology (gcache.core.graph): every node once, after its inputs,
in maximal waves, and the decision node last, reachable from every agent of the last round."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import gcache.testing as gt
from gcache.core.graph import DECISION, live_nodes, schedule
from gcache.core.sampling import fixed_topology, sample_topology
from gcache.core.topology import Topology, TopologyConfig, spatial_mask


def _sampled(case, seed: int) -> Topology:
    return sample_topology(case.logits, case.mask, case.config, torch.Generator().manual_seed(seed))


def _depths(sched) -> dict:
    return {node: d for d, wave in enumerate(sched.waves) for node in wave}


@given(gt.topology_cases(num_agents=st.integers(1, 5), num_rounds=st.integers(1, 3)), st.integers(0, 2**31))
def test_every_node_once_after_its_inputs_in_maximal_waves(case, seed):
    topology = _sampled(case, seed)
    n, rounds = case.config.num_agents, case.config.num_rounds
    sched = schedule(topology, rounds)
    nodes = [node for wave in sched.waves for node in wave]
    assert sorted(nodes) == [(r, j) for r in range(rounds) for j in range(n)], "every agent node exactly once"
    depth = _depths(sched)
    for node in nodes:
        ins = [depth[e.src] for e in sched.inputs[node]]
        assert all(d < depth[node] for d in ins), f"{node} runs before one of its inputs"
        # Maximal: a node runs as early as its inputs allow (wave 0 iff it has no input).
        assert depth[node] == (max(ins) + 1 if ins else 0)
    for wave in sched.waves:
        assert list(wave) == sorted(wave), "a wave lists its nodes in (round, agent) order"


@given(gt.topology_cases(num_agents=st.integers(1, 5), num_rounds=st.integers(1, 3)), st.integers(0, 2**31))
def test_inputs_are_exactly_the_topology_edges_with_their_probabilities(case, seed):
    topology = _sampled(case, seed)
    n, rounds = case.config.num_agents, case.config.num_rounds
    sp = torch.rand(n, n, generator=torch.Generator().manual_seed(seed))
    tp = torch.rand(n, n, generator=torch.Generator().manual_seed(seed + 1))
    sched = schedule(topology, rounds, spatial_probs=sp, temporal_probs=tp)
    for r in range(rounds):
        for j in range(n):
            want = [((r, i), float(sp[i, j])) for i in range(n) if topology.spatial[i, j]]
            want += [((r - 1, i), float(tp[i, j])) for i in range(n) if r > 0 and topology.temporal[i, j]]
            assert [(e.src, e.weight) for e in sched.inputs[(r, j)]] == want
    fed = [j for j in range(n) if topology.decision_inputs[j]]
    assert [(e.src, e.weight) for e in sched.inputs[DECISION]] == [((rounds - 1, j), 1.0) for j in fed]


@given(gt.topology_cases(num_agents=st.integers(1, 5), num_rounds=st.integers(1, 3)), st.integers(0, 2**31))
def test_decision_node_is_reachable_from_every_agent_of_the_last_round(case, seed):
    """Under the fixed wirings; "learned" may keep agents from the decision node by design."""
    assume(case.config.wiring != "learned")
    sched = schedule(_sampled(case, seed), case.config.num_rounds)
    last = case.config.num_rounds - 1
    reaches = {DECISION}
    changed = True
    while changed:  # fixed point of "some output of this node reaches the decision node"
        changed = False
        for node, edges in sched.inputs.items():
            if node in reaches:
                for e in edges:
                    if e.src not in reaches:
                        reaches.add(e.src)
                        changed = True
    missing = [j for j in range(case.config.num_agents) if (last, j) not in reaches]
    assert not missing, f"agents {missing} of the last round never reach the decision node"


def _closure_to(topology: Topology, rounds: int, targets: list) -> set:
    """Brute force: the (round, agent) nodes with a path to a target (or that are one), from the
    transitive closure of the round-expanded adjacency matrix (decision node last)."""
    n = topology.spatial.shape[0]
    index = {(r, j): r * n + j for r in range(rounds) for j in range(n)}
    index[DECISION] = rounds * n
    adj = torch.zeros(rounds * n + 1, rounds * n + 1, dtype=torch.bool)
    for r in range(rounds):
        adj[r * n : (r + 1) * n, r * n : (r + 1) * n] = topology.spatial
        if r > 0:
            adj[(r - 1) * n : r * n, r * n : (r + 1) * n] = topology.temporal
    adj[(rounds - 1) * n : rounds * n, rounds * n] = topology.decision_inputs
    reach = adj | torch.eye(len(adj), dtype=torch.bool)
    for _ in range(len(adj).bit_length()):
        reach = reach | ((reach.float() @ reach.float()) > 0)
    return {v for v, i in index.items() if v != DECISION and any(bool(reach[i, index[t]]) for t in targets)}


@given(gt.topology_cases(num_agents=st.integers(1, 5), num_rounds=st.integers(1, 3)), st.integers(0, 2**31),
       st.lists(st.tuples(st.integers(0, 2), st.integers(0, 4)), max_size=2))
def test_live_nodes_are_exactly_those_with_a_path_to_the_decision_or_an_answering_node(case, seed, answering):
    topology = _sampled(case, seed)
    n, rounds = case.config.num_agents, case.config.num_rounds
    answering = [(r, j) for r, j in answering if r < rounds and j < n]
    sched = schedule(topology, rounds)
    assert live_nodes(sched, answering) == _closure_to(topology, rounds, [DECISION, *answering])
    if case.config.wiring != "learned" and rounds == 1:  # the fixed wirings reach every agent of one round
        assert live_nodes(sched) == {(0, j) for j in range(n)}


def test_live_nodes_refuse_an_answering_node_the_schedule_does_not_run():
    config = TopologyConfig(3, mode="chain", optimize_spatial=False, optimize_temporal=False, wiring="sinks")
    sched = schedule(fixed_topology(spatial_mask("chain", 3), config), 1)
    with pytest.raises(ValueError, match=r"answering: expected agent nodes of the schedule, got \[\(0, 5\)\]"):
        live_nodes(sched, [(0, 5)])
    with pytest.raises(ValueError, match="answering"):
        live_nodes(sched, [DECISION])


def test_chain_runs_one_agent_per_wave_and_mesh_too():
    n = 4
    for mode in ("chain", "mesh"):
        config = TopologyConfig(n, mode=mode, optimize_spatial=False, optimize_temporal=False, wiring="sinks")
        sched = schedule(fixed_topology(spatial_mask(mode, n), config), 1)
        assert sched.waves == tuple(((0, j),) for j in range(n))
        assert sched.last == (0, n - 1)
        assert sched.sources(DECISION) == ((0, n - 1),)


def test_debate_runs_every_agent_of_a_round_in_one_wave():
    config = TopologyConfig(3, mode="debate", num_rounds=2, optimize_spatial=False, optimize_temporal=False)
    sched = schedule(fixed_topology(spatial_mask("debate", 3), config), 2)
    assert sched.waves == (((0, 0), (0, 1), (0, 2)), ((1, 0), (1, 1), (1, 2)))
    assert sched.sources((1, 2)) == ((0, 0), (0, 1), (0, 2))


def test_bad_topologies_are_refused_with_the_argument_named():
    ok = fixed_topology(spatial_mask("chain", 3), TopologyConfig(3, mode="chain", optimize_spatial=False,
                                                                 optimize_temporal=False))
    cyclic = ok._replace(spatial=ok.spatial | ok.spatial.T)
    with pytest.raises(ValueError, match="topology.spatial: the graph has a cycle"):
        schedule(cyclic, 1)
    with pytest.raises(ValueError, match="num_rounds"):
        schedule(ok, 0)
    with pytest.raises(ValueError, match="topology.temporal"):
        schedule(ok._replace(temporal=torch.ones(3, 3, dtype=torch.bool)), 1)
    with pytest.raises(ValueError, match="decision_inputs"):
        schedule(ok._replace(decision_inputs=torch.zeros(3, dtype=torch.bool)), 1)
    with pytest.raises(ValueError, match="one graph"):
        schedule(ok._replace(spatial=ok.spatial[None]), 1)


@given(gt.topology_configs(num_agents=st.integers(1, 5), num_rounds=st.integers(1, 3),
                           optimize_spatial=False, optimize_temporal=False, wirings=("all", "sinks")),
       st.integers(0, 2**31))
def test_fixed_topology_takes_every_forward_candidate_edge_with_log_prob_zero(config, seed):
    mask = spatial_mask(config.mode, config.num_agents, torch.Generator().manual_seed(seed))
    topology = fixed_topology(mask, config)
    n = config.num_agents
    assert torch.equal(topology.spatial, mask & torch.ones(n, n, dtype=torch.bool).triu(1))
    assert bool(topology.temporal.all()) if config.num_rounds > 1 else not bool(topology.temporal.any())
    assert torch.equal(topology.order, torch.arange(n))
    assert float(topology.log_prob) == 0.0
    schedule(topology, config.num_rounds)  # and it runs


def test_fixed_topology_refuses_a_config_that_learns():
    with pytest.raises(ValueError, match="fixed topology learns no edges"):
        fixed_topology(spatial_mask("full", 3), TopologyConfig(3, mode="full"))
