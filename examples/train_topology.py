"""Train a topology policy by REINFORCE on a reward you write yourself (no LLM involved).

Four agents (researcher, coder, reviewer, writer). The made-up reward: the
writer (3) must hear from the reviewer (2), the reviewer from the coder (1)
(+1 each), and every other edge costs 0.5, so the best graph is the chain
coder -> reviewer -> writer and nothing else (reward 2). The policy (a GCN over role and question features) samples a
node order and edges; each step draws a batch of graphs for one question,
scores them, and takes an Adam step on the REINFORCE loss with a leave-one-out
baseline. Everything is a pure function of explicit state.

    python examples/train_topology.py           # 300 steps, a few seconds to a minute
    python examples/train_topology.py --smoke   # 60 steps
"""

import argparse
import json

import torch

import gcache

ROLES = ("researcher", "coder", "reviewer", "writer")


def reward(topology: gcache.Topology) -> torch.Tensor:
    """Your task's score of each sampled graph, [...] float: +1 per wanted edge, -0.5 per other edge."""
    s = topology.spatial.float()  # [..., N, N]
    wanted = s[..., 1, 2] + s[..., 2, 3]
    return wanted - 0.5 * (gcache.num_edges(topology).float() - wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="fewer steps")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = 60 if args.smoke else args.steps

    g = torch.Generator().manual_seed(args.seed)
    n = len(ROLES)
    config = gcache.TopologyConfig(num_agents=n, mode="full")
    mask = gcache.spatial_mask("full", n)  # [N, N] every ordered pair is a candidate
    prior = ~torch.eye(n, dtype=torch.bool)  # [N, N] the roles' prior graph for the GCN
    # Stand-ins for sentence embeddings of the role profiles and of a few questions.
    roles = torch.randn(n, 32, generator=g)  # [N, D]
    questions = torch.randn(8, 32, generator=g)  # [Q, D]
    features = gcache.node_features(roles, questions)  # [Q, N, 2D]

    params = gcache.init_policy(config, features.shape[-1], g)
    opt = gcache.adam(lr=0.05)
    opt_state = opt.init(params)

    def mean_reward(p: gcache.PolicyParams, samples: int = 256) -> float:
        """Monte-Carlo estimate of the expected reward over every question (own generator: reproducible)."""
        with torch.no_grad():
            logits = gcache.policy_logits(p, features, prior)
            eval_g = torch.Generator().manual_seed(1234)
            return float(reward(gcache.sample_topology(logits, mask, config, eval_g, num_samples=samples)).mean())

    before = mean_reward(params)
    print(f"step    0: expected reward {before:+.3f}")
    for step in range(1, steps + 1):
        q = int(torch.randint(features.shape[0], (), generator=g))
        with torch.no_grad():
            logits = gcache.policy_logits(params, features[q], prior)
        topology = gcache.sample_topology(logits, mask, config, g, num_samples=args.batch_size)
        rewards = reward(topology)  # [B]
        baseline = gcache.batch_baseline(rewards)

        def loss_fn(p: gcache.PolicyParams) -> torch.Tensor:
            lp = gcache.log_prob(gcache.policy_logits(p, features[q], prior), mask, config, topology)  # [B]
            return gcache.reinforce_loss(lp, rewards, baseline)

        grads = torch.func.grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = gcache.apply_updates(params, updates)
        if step % max(steps // 6, 1) == 0:
            print(f"step {step:4d}: expected reward {mean_reward(params):+.3f}")

    after = mean_reward(params)
    with torch.no_grad():
        best = gcache.deterministic_topology(gcache.policy_logits(params, features[0], prior), mask, config)
    edges = [f"{ROLES[i]} -> {ROLES[j]}" for i, j in best.spatial.nonzero().tolist()]
    print(f"most likely graph for question 0: {', '.join(edges) or 'no edges'} (reward {float(reward(best)):+.2f})")
    print(json.dumps({"reward_before": round(before, 4), "reward_after": round(after, 4), "steps": steps}))


if __name__ == "__main__":
    main()
