"""The fuser's training signal (gcache.core.objectives) through a real (frozen) model.

The tiny random model cannot solve arithmetic, so its "reference answers" come from an informed
agent: the tokens the model itself decodes greedily when it reads agent 0's cache (agent 0 was told
the answer; agents 1 and 2 read a scrambled question and an unrelated sentence). Those tokens are
likely under agent 0's cache and less likely under a mixture, a signal that holds on unseen
questions, so a fuser that learns has to learn to lean on agent 0. The slow test on the embedded
model uses the true answers instead.
"""

import math

import pytest
import torch

from gcache.core.cache import keep_last
from gcache.core.fusion import FuserConfig, FuserParams, init_fuser
from gcache.core.latent import Decoding, generate, rollout
from gcache.core.objectives import AnswerBatch, answer_batch, answer_nll, fuser_loss
from gcache.core.optim import adam, value_and_grad
from gcache.core.reinforce import init_baseline
from gcache.core.train import FuserBatch, FuserExample, TrainState, train_step
from gcache.io.models.local import load_model, tiny_model

NAMES = ["Ann", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jo", "Kim", "Lee"]
SOURCES = [0, 1, 2]
NUM_AGENTS = 4  # agent 3 never sends: its logit must get no gradient


def question(i: int) -> tuple[str, int]:
    a, b = 3 + (7 * i) % 17, 2 + (5 * i) % 13
    return f"{NAMES[i % len(NAMES)]} has {a} apples and buys {b} more. How many apples now?", a + b


def encode(lm, texts):
    enc = lm.tokenizer(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"].bool()


def predecessor_caches(lm, ids, *, latent_steps=3):
    """Caches of three agents per question: told the answer, a scrambled question, an unrelated line."""
    qs = [question(i) for i in ids]
    prompts = [
        [f"Hint: the answer is {ans}. {q}" for q, ans in qs],
        [" ".join(q.split()[::-1]) for q, _ in qs],
        [f"The weather on day {i} was mild and dry." for i in ids],
    ]
    return [rollout(lm.fns, lm.realign, *encode(lm, p), latent_steps=latent_steps).cache for p in prompts]


def informed_task(lm, ids):
    """(caches, batch): the receiver reads the question; the targets are what agent 0's cache makes
    the model say next (4 greedy tokens)."""
    caches = predecessor_caches(lm, ids)
    qs = [question(i)[0] for i in ids]
    said = generate(lm.fns, *encode(lm, qs), Decoding(4), cache=caches[0], eos_token_ids=[])
    prompts = [lm.tokenizer(q)["input_ids"] for q in qs]
    return caches, answer_batch(prompts, said.tokens.tolist(), pad_token_id=lm.pad_token_id)


def left_pad(rows):
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row)
        mask[b, width - len(row):] = True
    return ids, mask


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model, saved):
    now = model.state_dict()
    assert now.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(now[k], v), k
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module")
def lm():
    # initializer_range 0.2: context changes the random model's greedy tokens, yet one
    # cache's tokens stay likely under it (at 0.3 and above single seeds turn chaotic)
    return tiny_model(seed=0, initializer_range=0.2)


@pytest.fixture(scope="module")
def train_task(lm):
    return informed_task(lm, range(16))


@pytest.fixture(scope="module")
def held_task(lm):
    return informed_task(lm, range(100, 116))


# ----------------------------------------------------------------------------- the objective


def plain_answer_nll(model, rows):
    """Reference: per-token NLL of each row's answer from one plain forward on its unpadded tokens."""
    per_row = []
    for prompt, answer in rows:
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logp = model(input_ids=ids).logits.float().log_softmax(-1)[0]  # [S, V]
        n = len(prompt)
        per_row.append(-sum(float(logp[n + j - 1, t]) for j, t in enumerate(answer)) / len(answer))
    return sum(per_row) / len(per_row)


def test_answer_batch_lays_out_prompt_then_answer_left_padded():
    b = answer_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_token_id=0)
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 2], [0, 8, 3, 4, 9]]
    assert b.attention_mask.tolist() == [[True] * 5, [False] + [True] * 4]
    assert b.target_mask.tolist() == [[False, False, False, True, True], [False, False, True, True, True]]


@pytest.mark.parametrize(
    "prompts, answers, match",
    [([[1]], [[2], [3]], "one answer per prompt"), ([[]], [[2]], r"prompts\[0\]"), ([[1]], [[]], r"answers\[0\]"),
     ([], [], "at least one row")],
)
def test_answer_batch_refuses_bad_rows(prompts, answers, match):
    with pytest.raises(ValueError, match=match):
        answer_batch(prompts, answers, pad_token_id=0)


def test_answer_nll_is_the_per_token_nll_of_a_plain_forward(lm):
    rows = [([5, 17, 300, 41], [7, 8]), ([900, 12], [3, 3, 3, 9])]
    batch = answer_batch(*zip(*rows), pad_token_id=lm.pad_token_id)
    got = float(answer_nll(lm.fns, None, batch))
    assert math.isclose(got, plain_answer_nll(lm.model, rows), rel_tol=1e-4, abs_tol=1e-4)
    empty = AnswerBatch(batch.input_ids, batch.attention_mask, torch.zeros_like(batch.target_mask))
    with pytest.raises(ValueError, match="at least one target token"):
        answer_nll(lm.fns, None, empty)


def test_concat_fusion_continues_like_one_sequence_in_any_order(lm):
    """Two caches that split one text (the second read on top of the first) concatenated, in
    either order, give the receiver exactly the likelihoods of a plain forward on the whole text."""
    first = [[11, 12, 13, 14, 15], [21, 22]]  # rows of different lengths: padding inside the parts
    second = [[31, 32], [41, 42, 43, 44]]
    receiver = [([51, 52], [61, 62, 63]), ([71], [81, 82])]
    c1 = rollout(lm.fns, lm.realign, *left_pad(first), latent_steps=0).cache
    c12 = rollout(lm.fns, lm.realign, *left_pad(second), cache=c1, latent_steps=0).cache
    c2 = keep_last(c12, c12.seq_len - c1.seq_len)
    batch = answer_batch([p for p, _ in receiver], [a for _, a in receiver], pad_token_id=lm.pad_token_id)
    rows = [(f + s + p, a) for f, s, (p, a) in zip(first, second, receiver)]
    want = plain_answer_nll(lm.model, rows)
    for order in ([c1, c2], [c2, c1]):
        got = float(fuser_loss(None, lm.fns, order, [1.0, 1.0], batch, mode="concat"))
        assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4)


# ----------------------------------------------------------------------------- gradients


def grads_of(loss_fn, params):
    """(loss, gradients) of ``loss_fn`` with respect to the fuser's parameters only."""
    loss, _, grads = value_and_grad(lambda p: (loss_fn(p), None), params)
    return loss, grads


def fuser_train_step(lm, params, caches, batch, mode, edge_weights, optimizer):
    """One step of the core's training step with the fuser alone learned, on one example."""
    state = TrainState({"fuser": params}, optimizer.init({"fuser": params}), init_baseline())
    example = FuserExample(tuple(caches), torch.tensor(edge_weights), torch.tensor(SOURCES), batch)
    new, _ = train_step(state, optimizer, torch.zeros(1), fuser=FuserBatch(lm.fns, mode, (example,)))
    return new


def test_gradients_reach_every_fuser_parameter_and_no_model_weight(lm, train_task):
    caches, batch = train_task
    saved = snapshot(lm.model)
    params = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    e = torch.tensor([0.7, 0.4, 0.9])
    loss, grads = grads_of(
        lambda p: fuser_loss(p, lm.fns, caches, e, batch, mode="learned", sources=SOURCES), params
    )
    assert math.isfinite(float(loss))
    assert bool((grads.gate_logits != 0).all())
    assert bool((grads.source_logits[SOURCES] != 0).all()) and float(grads.source_logits[3]) == 0.0
    assert_same_weights(lm.model, saved)


def test_fuser_grads_never_touch_an_unfrozen_model():
    lm = tiny_model(seed=1)
    lm.model.requires_grad_(True)  # a caller who forgot to freeze
    saved = snapshot(lm.model)
    caches = predecessor_caches(lm, range(2), latent_steps=1)
    batch = answer_batch([[5, 6], [7]], [[8, 9], [10, 11]], pad_token_id=lm.pad_token_id)
    params = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    _, grads = grads_of(
        lambda p: fuser_loss(p, lm.fns, caches, [0.3, 0.6, 0.9], batch, mode="learned", sources=SOURCES), params
    )
    assert bool((grads.gate_logits != 0).all())
    assert_same_weights(lm.model, saved)


def test_learned_fusion_passes_gradient_to_edge_probabilities(lm, train_task):
    caches, batch = train_task
    params = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    probs = torch.tensor([0.7, 0.4, 0.9], requires_grad=True)
    fuser_loss(params, lm.fns, caches, probs, batch, mode="learned", sources=SOURCES).backward()
    assert probs.grad is not None and bool((probs.grad != 0).all())
    # detached probabilities keep the fuser's loss off the topology
    detached = probs.detach()
    loss = fuser_loss(params, lm.fns, caches, detached, batch, mode="learned", sources=SOURCES)
    assert not loss.requires_grad


def test_gates_open_where_the_edge_weights_favour_the_informed_agent(lm, train_task):
    caches, batch = train_task
    params = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    favour = [0.8, 0.1, 0.1]
    _, grads = grads_of(lambda p: fuser_loss(p, lm.fns, caches, favour, batch, mode="weighted"), params)
    assert bool((grads.gate_logits < 0).all())  # descending opens every gate

    def at(gate):
        p = params._replace(gate_logits=torch.full_like(params.gate_logits, gate))
        with torch.no_grad():
            return float(fuser_loss(p, lm.fns, caches, favour, batch, mode="weighted"))

    assert at(math.inf) < at(0.0) < at(-math.inf)


def test_the_training_step_moves_only_the_fuser_and_refuses_non_finite_gradients(lm, train_task):
    """The one way to train the fuser is the core's training step (gcache.core.train.train_step)."""
    caches, batch = train_task
    params = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    before = tuple(t.clone() for t in params)
    new = fuser_train_step(lm, params, caches, batch, "learned", [0.5] * 3, adam(0.1))
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    # uniform edge weights and zero logits mix uniformly, so the gates have nothing to scale yet:
    # only the source logits move on the first step
    assert not torch.equal(new.params["fuser"].source_logits, params.source_logits)
    assert torch.equal(new.params["fuser"].gate_logits, params.gate_logits)
    assert int(new.opt_state.count) == 1
    broken = FuserParams(torch.full_like(params.gate_logits, math.nan), params.source_logits)
    with pytest.raises(ValueError, match="finite gradients"):
        fuser_train_step(lm, broken, caches, batch, "learned", [0.5] * 3, adam(0.1))


# ----------------------------------------------------------------------------- training


def train(lm, task, mode, *, steps, lr=0.1, edge_weights=(0.5, 0.5, 0.5)):
    caches, batch = task
    params = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    opt = adam(lr)
    state = TrainState({"fuser": params}, opt.init({"fuser": params}), init_baseline())
    example = FuserExample(tuple(caches), torch.tensor(edge_weights), torch.tensor(SOURCES), batch)
    for _ in range(steps):
        state, _ = train_step(state, opt, torch.zeros(1), fuser=FuserBatch(lm.fns, mode, (example,)))
    return state.params["fuser"]


def heldout(lm, task, params, mode, edge_weights=(0.5, 0.5, 0.5)):
    caches, batch = task
    with torch.no_grad():
        return float(fuser_loss(params, lm.fns, caches, edge_weights, batch, mode=mode, sources=SOURCES))


def fuser_learning(lm, train_task, held_task) -> dict:
    """30 steps of the learned fuser (lr 0.1) on ``train_task``: the held-out objective before and
    after, their ratio, the source the trained fuser prefers, and the silent agent's logit moved."""
    untrained = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    trained = train(lm, train_task, "learned", steps=30)
    before, after = heldout(lm, held_task, untrained, "learned"), heldout(lm, held_task, trained, "learned")
    return {"before": before, "after": after, "ratio": after / before,
            "preferred": int(trained.source_logits[SOURCES].argmax()),
            "silent_moved": not torch.equal(trained.source_logits[3], untrained.source_logits[3])}  # fmt: skip


def test_training_lowers_the_heldout_objective_and_leaves_the_model_alone(lm, train_task, held_task):
    """Seed study (benchmarks/seed_studies.py, study fuser_learning: the tiny model drawn with seed
    s in 100-119, so its informed targets change too): the held-out objective fell below 0.85 x
    its start for 20/20 seeds (highest ratio 0.797), the informed agent was preferred in 20/20 and
    the silent agent's logit never moved."""
    saved = snapshot(lm.model)
    got = fuser_learning(lm, train_task, held_task)
    assert got["ratio"] < 0.85, got
    # it learned whom to trust: the agent that was told the answer
    assert got["preferred"] == 0
    assert not got["silent_moved"]
    assert_same_weights(lm.model, saved)


# ----------------------------------------------------------------------------- the embedded model (slow)


def embedded_fuser_learning(lm, train_ids, held_ids) -> dict:
    """6 steps of the learned fuser (lr 0.3) on the embedded model, the true answers as targets:
    the held-out answer NLL before and after, and the source the trained fuser prefers."""

    def task(ids):
        caches = predecessor_caches(lm, ids, latent_steps=2)
        qs = [question(i) for i in ids]
        prompts = [lm.tokenizer(f"{q} Answer:")["input_ids"] for q, _ in qs]
        answers = [lm.tokenizer(f" {ans}")["input_ids"] for _, ans in qs]
        return caches, answer_batch(prompts, answers, pad_token_id=lm.pad_token_id)

    train_set, held_set = task(train_ids), task(held_ids)
    untrained = init_fuser(FuserConfig(lm.fns.num_layers, NUM_AGENTS))
    trained = train(lm, train_set, "learned", steps=6, lr=0.3)
    before, after = heldout(lm, held_set, untrained, "learned"), heldout(lm, held_set, trained, "learned")
    return {"before": before, "after": after, "fall": before - after,
            "preferred": int(trained.source_logits[SOURCES].argmax())}  # fmt: skip


@pytest.mark.slow
def test_training_on_the_embedded_model_raises_the_heldout_likelihood_of_true_answers():
    """Nothing here is random but the questions. Seed study (study fuser_learning_embedded: train
    questions 4s to 4s + 3, held-out 4s + 50 to 4s + 53, s in 100-119; this test is s = 0): the
    held-out NLL fell by more than 0.1 for 20/20 question sets (smallest fall 0.428) and the
    informed agent was preferred in 20/20."""
    lm = load_model("smollm2-135m", dtype="float32")
    saved = snapshot(lm.model)
    got = embedded_fuser_learning(lm, range(4), range(50, 54))
    assert got["fall"] > 0.1, got
    assert got["preferred"] == 0
    assert_same_weights(lm.model, saved)
