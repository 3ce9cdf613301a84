"""Three agents that talk through KV-caches, composed by hand from gcache's core functions.

LatentMAS's sequential pipeline: a planner reads the question and thinks for
``latent_steps`` steps in latent space (its realigned last hidden state fed
back as the next input, no tokens); a critic reads its own prompt on top of the
planner's whole cache and thinks in turn; a judger reads its prompt on top of
that cache and writes the answer. No text passes between agents: only the
cache, which grows along the chain. The judger alone (no cache) is shown too.

    python examples/latent_agents.py           # embedded SmolLM2-135M, about a minute on 2 quiet cores
    python examples/latent_agents.py --smoke   # tiny random model, seconds (its answer is gibberish)
"""

import argparse
import time

import torch

import gcache

QUESTION = "A farmer has 12 sheep and buys 3 times as many. How many sheep does he have now?"
ROLES = {
    "planner": "You are a planner. Break the problem into steps.",
    "critic": "You are a critic. Check the plan you were given for mistakes.",
    "judger": "You are a judger. Solve the problem and give the final answer as a number.",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random model, few steps")
    parser.add_argument("--latent-steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    latent_steps, max_new_tokens = (3, 8) if args.smoke else (args.latent_steps, args.max_new_tokens)
    decoding = gcache.Decoding(max_new_tokens=max_new_tokens)  # greedy

    start = time.perf_counter()
    lm = gcache.tiny_model() if args.smoke else gcache.load_model()
    print(f"model {lm.name} loaded in {time.perf_counter() - start:.1f} s")

    def prompt(role: str) -> tuple[torch.Tensor, torch.Tensor]:  # input_ids, attention_mask: [1, S]
        return lm.encode_chat([[{"role": "system", "content": ROLES[role]}, {"role": "user", "content": QUESTION}]])

    start = time.perf_counter()
    with torch.no_grad():
        planner = gcache.rollout(lm.fns, lm.realign, *prompt("planner"), latent_steps=latent_steps)
        # The critic's prompt continues at the planner's next position, attending to all of its cache.
        critic = gcache.rollout(lm.fns, lm.realign, *prompt("critic"), cache=planner.cache, latent_steps=latent_steps)
        answer = gcache.generate(lm.fns, *prompt("judger"), decoding, cache=critic.cache, eos_token_ids=lm.eos_token_ids)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        alone = gcache.generate(lm.fns, *prompt("judger"), decoding, eos_token_ids=lm.eos_token_ids)

    for name, r in (("planner", planner), ("critic", critic)):
        print(f"{name}: {int(r.prompt_tokens[0])} prompt tokens + {r.latent_tokens} latent steps, cache "
              f"[L, B, H, T, D] = {list(r.cache.keys.shape)}, next_pos {int(r.cache.next_pos[0])}")
    print(f"judger reads {critic.cache.seq_len} cached positions ({gcache.nbytes(critic.cache) / 2**20:.2f} MiB)")
    print(f"judger after the latent agents ({int(answer.lengths[0])} tokens): "
          f"{lm.decode_text(answer.tokens, answer.lengths)[0]!r}")
    print(f"judger alone ({int(alone.lengths[0])} tokens): {lm.decode_text(alone.tokens, alone.lengths)[0]!r}")
    print(f"three agents in {elapsed:.1f} s")


if __name__ == "__main__":
    main()
