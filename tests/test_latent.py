"""Latent core on tiny random Llama/Qwen3 models and (marked slow) on the embedded SmolLM2-135M.

References: transformers' own forward, hidden_states[-1] and model.generate; a
prompt run alone versus inside a left-padded batch; a prompt read whole versus
in two pieces through a cache.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gcache.core.cache import KVCache, concat, keep_last
from gcache.core.latent import Decoding, _sample, generate, prefill, rollout, sequence_logprob
from gcache.io.models.local import load_model, tiny_model
from tests._latent_helpers import QUESTIONS, conversations, hf_latent_reference, hf_logits, real_positions

ATOL = 1e-4
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return tiny_model(request.param, seed=0)


@pytest.fixture(scope="module")
def embedded():
    return load_model("smollm2-135m", dtype="float32")


def _one(lm, question: str):
    return lm.encode_chat(conversations([question]))


def _close(a, b, atol=ATOL, rtol=1e-4):
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=atol, rtol=rtol), float((a - b).abs().max())


# A batch and a single row are summed in different orders by the BLAS kernels (the blocking
# depends on the shapes and the thread count), and latent steps feed those float32 rounding
# differences back as inputs; on the tiny models' large random weights they reach ~1e-3
# after a few steps. Batched-vs-single comparisons therefore use this tolerance (the generated
# tokens must still be identical).
BATCH_TOL = 2e-3


# --------------------------------------------------------------------------- prefill and latent steps


def _check_latent_zero_is_prefill(lm):
    ids, mask = lm.encode_chat(conversations())
    r = rollout(lm.fns, lm.realign, ids, mask, latent_steps=0)
    p = prefill(lm.fns, ids, mask)
    plain = lm.fns.from_state(p.state, p.mask, p.next_pos)
    for got, want in zip(r.cache, plain):
        assert torch.equal(got, want)
    assert r.latent_tokens == 0
    assert torch.equal(r.prompt_tokens, mask.sum(1))
    # and the prefill itself matches transformers' full forward on each prompt alone
    for b, q in enumerate(QUESTIONS):
        ids1, _ = _one(lm, q)
        want = hf_logits(lm.model, ids1)[0, -1]
        _close(lm.fns.logits(p.hidden[b, -1]), want)


def test_latent_zero_equals_prefill(tiny):
    _check_latent_zero_is_prefill(tiny)


def _check_latent_steps_match_reference(lm, steps, questions=QUESTIONS[:2]):
    for q in questions:
        ids, mask = _one(lm, q)
        r = rollout(lm.fns, lm.realign, ids, mask, latent_steps=steps)
        h, keys0 = hf_latent_reference(lm.model, ids, steps)
        _close(r.hidden, h)
        _close(r.cache.keys[0], keys0)
        assert r.cache.seq_len == ids.shape[1] + steps
        assert r.cache.next_pos.tolist() == [ids.shape[1] + steps]
        assert bool(r.cache.mask.all())


def test_latent_steps_match_full_model_reference(tiny):
    _check_latent_steps_match_reference(tiny, 4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_latent_steps_with_untied_embeddings_match_the_formula(arch):
    """With W_out != W_in, W_a is far from the identity, so the reference checks the matrix, not only the norm."""
    lm = tiny_model(arch, seed=3, tie_word_embeddings=False)
    w_in, w_out = lm.model.get_input_embeddings().weight, lm.model.get_output_embeddings().weight
    assert not torch.allclose(w_in, w_out, atol=0.1)
    _check_latent_steps_match_reference(lm, 4)


def _check_batch_equals_single(lm, steps, new_tokens):
    ids, mask = lm.encode_chat(conversations())
    assert len(set(mask.sum(1).tolist())) == 3  # three different lengths: the batch is padded
    r = rollout(lm.fns, lm.realign, ids, mask, latent_steps=steps)
    g = generate(lm.fns, ids, mask, Decoding(new_tokens), eos_token_ids=lm.eos_token_ids)
    for b, q in enumerate(QUESTIONS):
        ids1, mask1 = _one(lm, q)
        r1 = rollout(lm.fns, lm.realign, ids1, mask1, latent_steps=steps)
        for got, want in zip(real_positions(r.cache, b), real_positions(r1.cache, 0)):
            _close(got, want, atol=BATCH_TOL, rtol=BATCH_TOL)
        _close(r.hidden[b], r1.hidden[0], atol=BATCH_TOL, rtol=BATCH_TOL)
        assert int(r.cache.next_pos[b]) == int(r1.cache.next_pos[0])
        assert int(r.prompt_tokens[b]) == ids1.shape[1]
        g1 = generate(lm.fns, ids1, mask1, Decoding(new_tokens), eos_token_ids=lm.eos_token_ids)
        n = int(g1.lengths[0])
        assert int(g.lengths[b]) == n
        assert torch.equal(g.tokens[b, :n], g1.tokens[0, :n])


def test_left_padded_batch_equals_single_runs(tiny):
    _check_batch_equals_single(tiny, 3, 6)


def test_batch_on_padded_incoming_cache_equals_single_runs(tiny):
    """Prefix batch (left padded) -> cache -> suffix batch (left padded again): every row as if alone."""
    prefixes = tiny.encode_chat(conversations())
    suffixes = [" Think step by step.", " Answer:", " Be brief and precise please."]
    tok = tiny.tokenizer
    rows = [tok(s, add_special_tokens=False)["input_ids"] for s in suffixes]
    width = max(map(len, rows))
    suf_ids = torch.full((3, width), tiny.pad_token_id)
    suf_mask = torch.zeros(3, width, dtype=torch.bool)
    for b, r in enumerate(rows):
        suf_ids[b, width - len(r) :] = torch.tensor(r)
        suf_mask[b, width - len(r) :] = True
    first = rollout(tiny.fns, tiny.realign, *prefixes, latent_steps=2)
    second = rollout(tiny.fns, tiny.realign, suf_ids, suf_mask, cache=first.cache, latent_steps=2)
    for b, q in enumerate(QUESTIONS):
        ids1, mask1 = _one(tiny, q)
        a = rollout(tiny.fns, tiny.realign, ids1, mask1, latent_steps=2)
        s = torch.tensor([rows[b]])
        a2 = rollout(tiny.fns, tiny.realign, s, torch.ones_like(s, dtype=torch.bool), cache=a.cache, latent_steps=2)
        _close(second.hidden[b], a2.hidden[0], atol=BATCH_TOL, rtol=BATCH_TOL)
        for got, want in zip(real_positions(second.cache, b), real_positions(a2.cache, 0)):
            _close(got, want, atol=BATCH_TOL, rtol=BATCH_TOL)
        assert int(second.cache.next_pos[b]) == int(a2.cache.next_pos[0])


def _check_prefix_suffix(lm):
    ids, mask = _one(lm, QUESTIONS[2])
    cut = ids.shape[1] // 2
    full = prefill(lm.fns, ids, mask)
    head = rollout(lm.fns, lm.realign, ids[:, :cut], mask[:, :cut], latent_steps=0).cache
    tail = prefill(lm.fns, ids[:, cut:], mask[:, cut:], cache=head)
    _close(lm.fns.logits(tail.hidden), lm.fns.logits(full.hidden[:, cut:]))
    _close(lm.fns.logits(tail.hidden), hf_logits(lm.model, ids)[:, cut:])
    assert torch.equal(tail.next_pos, full.next_pos)


def test_prefill_prefix_then_suffix_equals_whole(tiny):
    _check_prefix_suffix(tiny)


def test_sliced_and_concatenated_cache_keeps_positions(tiny):
    """A cache cut in two and glued back, with a padded piece in between, reads like the original."""
    ids, mask = _one(tiny, QUESTIONS[2])
    cut = ids.shape[1] - 5
    head = rollout(tiny.fns, tiny.realign, ids[:, :cut], mask[:, :cut], latent_steps=0).cache
    a = KVCache(head.keys[:, :, :, :7], head.values[:, :, :, :7], head.mask[:, :7], torch.tensor([7]))
    b = keep_last(head, cut - 7)
    # a masked-out junk position between the two pieces must change nothing
    junk = KVCache(torch.randn_like(b.keys[:, :, :, :1]), torch.randn_like(b.values[:, :, :, :1]),
                   torch.zeros(1, 1, dtype=torch.bool), torch.tensor([0]))
    glued = concat([a, junk, b])
    want = prefill(tiny.fns, ids[:, cut:], mask[:, cut:], cache=head)
    got = prefill(tiny.fns, ids[:, cut:], mask[:, cut:], cache=glued)
    _close(tiny.fns.logits(got.hidden), tiny.fns.logits(want.hidden))


def test_latent_only_is_the_tail_of_the_whole_cache(tiny):
    ids, mask = tiny.encode_chat(conversations())
    whole = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=3)
    tail = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=3, latent_only=True)
    want = keep_last(whole.cache, 3)
    for got, exp in zip(tail.cache, want):
        assert torch.equal(got, exp)
    assert tail.cache.seq_len == 3 and bool(tail.cache.mask.all())
    empty = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=0, latent_only=True).cache
    assert empty.seq_len == 0 and torch.equal(empty.next_pos, whole.cache.next_pos - 3)


def test_rollout_on_prefix_cache_equals_rollout_on_whole_prompt(tiny):
    ids, mask = _one(tiny, QUESTIONS[0])
    cut = ids.shape[1] - 4
    head = rollout(tiny.fns, tiny.realign, ids[:, :cut], mask[:, :cut], latent_steps=0).cache
    a = rollout(tiny.fns, tiny.realign, ids[:, cut:], mask[:, cut:], cache=head, latent_steps=3)
    b = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=3)
    _close(a.hidden, b.hidden)
    _close(a.cache.keys, b.cache.keys)
    assert int(a.prompt_tokens[0]) == 4


def test_inputs_are_not_mutated(tiny):
    ids, mask = tiny.encode_chat(conversations())
    cache = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=2).cache
    before = [t.clone() for t in cache]
    ids0, mask0 = ids.clone(), mask.clone()
    rollout(tiny.fns, tiny.realign, ids, mask, cache=cache, latent_steps=2)
    generate(tiny.fns, ids, mask, Decoding(3), cache=cache, eos_token_ids=tiny.eos_token_ids)
    sequence_logprob(tiny.fns, cache, ids, mask, mask & (torch.arange(ids.shape[1]) > ids.shape[1] - 3))
    for t, t0 in zip(cache, before):
        assert torch.equal(t, t0)
    assert torch.equal(ids, ids0) and torch.equal(mask, mask0)


# --------------------------------------------------------------------------- decoding


def test_greedy_generate_equals_transformers_generate(tiny):
    for q in QUESTIONS:
        ids, mask = _one(tiny, q)
        g = generate(tiny.fns, ids, mask, Decoding(10), eos_token_ids=tiny.eos_token_ids)
        want = tiny.model.generate(ids, attention_mask=mask.long(), max_new_tokens=10, do_sample=False,
                                   eos_token_id=list(tiny.eos_token_ids), pad_token_id=tiny.pad_token_id)
        assert g.tokens[0].tolist() == want[0, ids.shape[1]:].tolist()


def test_greedy_from_prefix_cache_equals_from_whole_prompt(tiny):
    ids, mask = _one(tiny, QUESTIONS[2])
    cut = ids.shape[1] // 2
    head = rollout(tiny.fns, tiny.realign, ids[:, :cut], mask[:, :cut], latent_steps=0).cache
    a = generate(tiny.fns, ids[:, cut:], mask[:, cut:], Decoding(8), cache=head, eos_token_ids=[])
    b = generate(tiny.fns, ids, mask, Decoding(8), eos_token_ids=[])
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape == (1, 8)


def test_generate_stops_rows_at_eos(tiny):
    ids, mask = tiny.encode_chat(conversations())
    free = generate(tiny.fns, ids, mask, Decoding(6), eos_token_ids=[])
    assert free.lengths.tolist() == [6, 6, 6] and not bool(free.stopped.any())
    # make row 0's third token and row 1's fifth token the EOS; row 2 must run on unchanged
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 4])]
    g = generate(tiny.fns, ids, mask, Decoding(6), eos_token_ids=eos, pad_token_id=7)
    for b in range(3):
        row = free.tokens[b].tolist()
        first = next((i for i, t in enumerate(row) if t in eos), None)
        n = 6 if first is None else first
        assert int(g.lengths[b]) == n
        assert bool(g.stopped[b]) == (first is not None)
        assert g.tokens[b, :n].tolist() == row[:n]
        if first is not None:
            assert int(g.tokens[b, n]) in eos
            assert g.tokens[b, n + 1 :].tolist() == [7] * (g.tokens.shape[1] - n - 1)


def test_generate_stops_loop_when_all_rows_ended(tiny):
    ids, mask = _one(tiny, QUESTIONS[0])
    free = generate(tiny.fns, ids, mask, Decoding(5), eos_token_ids=[])
    g = generate(tiny.fns, ids, mask, Decoding(50), eos_token_ids=[int(free.tokens[0, 1])])
    assert g.tokens.shape[1] <= 2 and bool(g.stopped.all())


def _check_cache_holds_prompt_and_answer(lm, g):
    """Row b of g.cache equals a prefill of QUESTIONS[b]'s prompt followed by its kept answer tokens."""
    for b, q in enumerate(QUESTIONS):
        n = int(g.lengths[b])
        ids1, _ = _one(lm, q)
        full = torch.cat([ids1, g.tokens[b : b + 1, :n]], dim=1)
        want = rollout(lm.fns, lm.realign, full, torch.ones_like(full, dtype=torch.bool), latent_steps=0).cache
        for got, exp in zip(real_positions(g.cache, b), real_positions(want, 0)):
            _close(got, exp)
        assert int(g.cache.next_pos[b]) == full.shape[1]


def test_generation_cache_holds_prompt_and_answer(tiny):
    ids, mask = tiny.encode_chat(conversations())
    free = generate(tiny.fns, ids, mask, Decoding(5), eos_token_ids=[])
    g = generate(tiny.fns, ids, mask, Decoding(5), eos_token_ids=[int(free.tokens[1, 2])])
    _check_cache_holds_prompt_and_answer(tiny, g)


def test_finished_rows_leave_the_batch_and_change_nothing(tiny):
    ids, mask = tiny.encode_chat(conversations())
    free = generate(tiny.fns, ids, mask, Decoding(10), eos_token_ids=[])
    # rows 0 and 1 end early (at their 2nd and 4th tokens), row 2 runs on
    eos = [int(free.tokens[0, 1]), int(free.tokens[1, 3])]
    sizes = []

    def forward(embeds, *args):
        sizes.append(embeds.shape[0])
        return tiny.fns.forward(embeds, *args)

    g = generate(tiny.fns._replace(forward=forward), ids, mask, Decoding(10), eos_token_ids=eos)
    if int(g.lengths[2]) > 4:
        assert min(sizes) < 3, sizes  # the ended rows were taken out of the forward
    for b, q in enumerate(QUESTIONS):
        ids1, mask1 = _one(tiny, q)
        alone = generate(tiny.fns, ids1, mask1, Decoding(10), eos_token_ids=eos)
        n = int(alone.lengths[0])
        assert int(g.lengths[b]) == n and bool(g.stopped[b]) == bool(alone.stopped[0])
        assert g.tokens[b, :n].tolist() == alone.tokens[0, :n].tolist()
        for got, want in zip(real_positions(g.cache, b), real_positions(alone.cache, 0)):
            _close(got, want, atol=BATCH_TOL, rtol=BATCH_TOL)
        assert int(g.cache.next_pos[b]) == int(alone.cache.next_pos[0])


def test_stop_rule_ends_rows_after_the_token_it_fires_on(tiny):
    ids, mask = tiny.encode_chat(conversations())
    free = generate(tiny.fns, ids, mask, Decoding(8), eos_token_ids=[])
    ends = [2, None, 5]  # row 0 ends after its 3rd token, row 2 after its 6th, row 1 never
    seen = []

    def stop(tokens, running):
        seen.append((tokens.clone(), running.clone()))
        n = tokens.shape[1]
        return torch.tensor([e is not None and n == e + 1 for e in ends])

    g = generate(tiny.fns, ids, mask, Decoding(8, stop=stop), eos_token_ids=[], pad_token_id=7)
    assert g.lengths.tolist() == [3, 8, 6] and g.stopped.tolist() == [True, False, True]
    for b, n in enumerate(g.lengths.tolist()):
        assert g.tokens[b, :n].tolist() == free.tokens[b, :n].tolist()  # the rule changes no token
        assert g.tokens[b, n:].tolist() == [7] * (g.tokens.shape[1] - n)
    # the rule sees every step's tokens so far, and which rows still run
    assert [t.shape[1] for t, _ in seen] == list(range(1, 9))
    assert seen[3][1].tolist() == [False, True, True] and seen[7][1].tolist() == [False, True, False]
    # the cache holds each row's prompt and exactly its kept answer tokens
    _check_cache_holds_prompt_and_answer(tiny, g)


def test_stop_rule_ending_every_row_ends_the_loop(tiny):
    ids, mask = tiny.encode_chat(conversations())
    calls = []

    def stop(tokens, running):
        calls.append(tokens.shape[1])
        return torch.full((3,), tokens.shape[1] == 2)

    g = generate(tiny.fns, ids, mask, Decoding(50, stop=stop), eos_token_ids=[])
    assert calls == [1, 2] and g.tokens.shape == (3, 2) and g.lengths.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="stop"):
        generate(tiny.fns, ids, mask, Decoding(3, stop=lambda t, r: torch.ones(2, dtype=torch.bool)), eos_token_ids=[])


def test_sampling_is_seeded_and_reproducible(tiny):
    ids, mask = tiny.encode_chat(conversations())
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = generate(tiny.fns, ids, mask, Decoding(**kw, seed=1), eos_token_ids=[])
    b = generate(tiny.fns, ids, mask, Decoding(**kw, seed=1), eos_token_ids=[])
    c = generate(tiny.fns, ids, mask, Decoding(**kw, seed=2), eos_token_ids=[])
    unseeded = generate(tiny.fns, ids, mask, Decoding(**kw), eos_token_ids=[])
    zero = generate(tiny.fns, ids, mask, Decoding(**kw, seed=0), eos_token_ids=[])
    greedy = generate(tiny.fns, ids, mask, Decoding(8), eos_token_ids=[])
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, greedy.tokens)
    assert torch.equal(unseeded.tokens, zero.tokens)  # seed None draws as seed 0
    # a nucleus so small it holds only the most likely token is greedy decoding
    tiny_nucleus = generate(tiny.fns, ids, mask, Decoding(**{**kw, "top_p": 1e-6}, seed=3), eos_token_ids=[])
    assert torch.equal(tiny_nucleus.tokens, greedy.tokens)


def test_sampling_draws_like_transformers_from_the_same_seed(tiny):
    """At temperature 1 and top_p 1, a seeded generate draws what transformers' sampling draws from
    the global generator seeded alike (both: softmax then one torch.multinomial per step)."""
    for seed, q in enumerate(QUESTIONS):
        ids, mask = _one(tiny, q)
        g = generate(tiny.fns, ids, mask, Decoding(10, temperature=1.0, seed=seed), eos_token_ids=[])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            want = tiny.model.generate(ids, attention_mask=mask.long(), max_new_tokens=10, min_new_tokens=10,
                                       do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                                       pad_token_id=tiny.pad_token_id)
        assert g.tokens[0].tolist() == want[0, ids.shape[1]:].tolist()


NUCLEUS_LOGITS = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))


def nucleus_frequencies(seed: int, draws: int = 4000) -> torch.Tensor:
    """[5] the frequency of each of 5 tokens in ``draws`` draws at top_p 0.75 (generator ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    drawn = torch.stack([_sample(NUCLEUS_LOGITS, 1.0, 0.75, g) for _ in range(draws)]).flatten()
    return torch.bincount(drawn, minlength=5).float() / draws


# {0.4, 0.3} has mass 0.7 < 0.75, so 0.15 joins; renormalised over 0.85
NUCLEUS_WANT = torch.tensor([0.4, 0.3, 0.15, 0, 0]) / 0.85


def test_sample_nucleus_by_enumeration():
    """Brute force on 5 tokens: draws land only in the smallest prefix reaching top_p, in proportion.

    Seed study (benchmarks/seed_studies.py, study nucleus_frequencies, generator seeds 100-119):
    every frequency within 0.03 of its probability for 20/20 seeds, largest error 0.0196 (the
    binomial standard deviation of 4000 draws is at most 0.008)."""
    counts = nucleus_frequencies(0)
    assert torch.allclose(counts, NUCLEUS_WANT, atol=0.03), counts
    assert _sample(NUCLEUS_LOGITS, 0.0, 0.5, torch.Generator().manual_seed(0)).tolist() == [0]


# --------------------------------------------------------------------------- scoring


def test_sequence_logprob_matches_full_forward_and_reaches_the_cache(tiny):
    ids, mask = _one(tiny, QUESTIONS[0])
    cut = ids.shape[1] - 6
    head = rollout(tiny.fns, tiny.realign, ids[:, :cut], mask[:, :cut], latent_steps=0).cache
    tail_ids, tail_mask = ids[:, cut:], mask[:, cut:]
    target = torch.zeros_like(tail_mask)
    target[:, 2:] = True
    cache = head._replace(keys=head.keys.clone().requires_grad_(True), values=head.values.clone().requires_grad_(True))
    lp = sequence_logprob(tiny.fns, cache, tail_ids, tail_mask, target)
    logp = torch.log_softmax(hf_logits(tiny.model, ids)[0, :-1].float(), dim=-1)
    want = sum(float(logp[cut + s - 1, ids[0, cut + s]]) for s in range(2, tail_ids.shape[1]))
    assert lp.shape == (1,) and abs(float(lp[0].detach()) - want) < 1e-3
    lp.sum().backward()
    assert cache.keys.grad is not None and float(cache.keys.grad.abs().sum()) > 0
    assert cache.values.grad is not None and float(cache.values.grad.abs().sum()) > 0
    assert all(p.grad is None for p in tiny.model.parameters())


def test_sequence_logprob_batch_equals_single_rows(tiny):
    ids, mask = tiny.encode_chat(conversations())
    target = mask & (torch.arange(ids.shape[1]) >= ids.shape[1] - 4)
    lp = sequence_logprob(tiny.fns, None, ids, mask, target)
    for b, q in enumerate(QUESTIONS):
        ids1, mask1 = _one(tiny, q)
        t1 = torch.zeros_like(mask1)
        t1[:, -4:] = True
        assert abs(float(lp[b]) - float(sequence_logprob(tiny.fns, None, ids1, mask1, t1)[0])) < 1e-3


# --------------------------------------------------------------------------- bad input


def test_bad_input_raises_naming_the_argument(tiny):
    ids, mask = _one(tiny, QUESTIONS[0])
    with pytest.raises(ValueError, match="latent_steps"):
        rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=-1)
    with pytest.raises(ValueError, match="input_ids"):
        rollout(tiny.fns, tiny.realign, ids[:, :0], mask[:, :0], latent_steps=1)
    padded = torch.cat([ids, ids])
    no_real = torch.cat([mask, torch.zeros_like(mask)])
    with pytest.raises(ValueError, match=r"attention_mask.*rows \[1\]"):
        rollout(tiny.fns, tiny.realign, padded, no_real, latent_steps=1)
    right = mask.clone()
    right[0, -1] = False
    with pytest.raises(ValueError, match="LEFT padding"):
        generate(tiny.fns, ids, right, Decoding(2), eos_token_ids=[])
    with pytest.raises(TypeError, match="decoding: expected a Decoding, got int"):
        generate(tiny.fns, ids, mask, 2, eos_token_ids=[])
    with pytest.raises(ValueError, match="target_mask"):
        sequence_logprob(tiny.fns, None, ids, mask, torch.ones_like(mask))


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", -1), ("max_new_tokens", True), ("max_new_tokens", 2.0), ("max_new_tokens", None),
        ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", "1"),
        ("temperature", True),
        ("top_p", 0.0), ("top_p", 1.5), ("top_p", -1.0), ("top_p", float("nan")), ("top_p", None),
        ("seed", 1.0), ("seed", True), ("seed", "3"), ("seed", 2**64),
    ],
)
def test_decoding_rejects_each_bad_field_by_name(field, value):
    kwargs = {"max_new_tokens": 4, field: value}
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        Decoding(**kwargs)


def test_decoding_accepts_the_edges_and_is_frozen():
    d = Decoding(0, temperature=0, top_p=1.0, seed=-5, stop=lambda t, r: r)
    assert d.max_new_tokens == 0 and Decoding(1, top_p=1e-9).top_p == 1e-9 and Decoding(1, seed=2**64 - 1).seed
    with pytest.raises(TypeError, match="^stop: expected None or a callable"):
        Decoding(4, stop="####")
    with pytest.raises(Exception, match="cannot assign"):
        d.max_new_tokens = 5


def test_cache_from_another_model_shape_is_rejected(tiny):
    arch = "qwen3" if "qwen3" in tiny.name else "llama"
    other = tiny_model(arch, num_hidden_layers=3, num_key_value_heads=4)
    ids, mask = _one(other, QUESTIONS[1])
    foreign = rollout(other.fns, other.realign, ids, mask, latent_steps=1).cache
    with pytest.raises(ValueError, match=r"cache: expected \[L, B, H, \*, D\] = \[2, 1, 2, \*, 16\].*\(3, 1, 4, "):
        rollout(tiny.fns, tiny.realign, ids, mask, cache=foreign, latent_steps=1)
    with pytest.raises(ValueError, match=r"cache: expected dtype"):
        half = rollout(tiny.fns, tiny.realign, ids, mask, latent_steps=0).cache
        generate(tiny.fns, ids, mask, Decoding(1), cache=half._replace(keys=half.keys.half(), values=half.values.half()),
                 eos_token_ids=[])
    with pytest.raises(ValueError, match=r"cache: expected.*batch"):
        two = rollout(tiny.fns, tiny.realign, torch.cat([ids, ids]), torch.cat([mask, mask]), latent_steps=0).cache
        rollout(tiny.fns, tiny.realign, ids, mask, cache=two, latent_steps=0)


# --------------------------------------------------------------------------- benchmark smoke


def test_benchmark_smoke_writes_results(tmp_path):
    out = tmp_path / "latent_step.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "latent_step.py"), "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    data = json.loads(out.read_text())
    assert {"model", "dtype", "threads", "results", "machine", "torch"} <= set(data)
    assert [r["cache_len"] for r in data["results"]] == [128, 512, 2048], "one result per default cache length"
    for r in data["results"]:
        assert r["gcache_ms"] > 0 and r["bare_ms"] > 0
        assert abs(r["ratio"] - r["gcache_ms"] / r["bare_ms"]) < 1e-6


# --------------------------------------------------------------------------- the embedded model (slow)


@pytest.mark.slow
def test_embedded_latent_zero_and_prefill_match_transformers(embedded):
    _check_latent_zero_is_prefill(embedded)


@pytest.mark.slow
def test_embedded_prefix_then_suffix_equals_whole(embedded):
    _check_prefix_suffix(embedded)


@pytest.mark.slow
def test_embedded_latent_steps_match_full_model_reference(embedded):
    _check_latent_steps_match_reference(embedded, 3, QUESTIONS[:1])


@pytest.mark.slow
def test_embedded_batch_of_three_equals_single_runs(embedded):
    _check_batch_equals_single(embedded, 2, 3)


@pytest.mark.slow
def test_embedded_greedy_generate_equals_transformers_and_answers(embedded):
    ids, mask = _one(embedded, QUESTIONS[0])
    g = generate(embedded.fns, ids, mask, Decoding(16), eos_token_ids=embedded.eos_token_ids)
    want = embedded.model.generate(ids, attention_mask=mask.long(), max_new_tokens=16, do_sample=False,
                                   eos_token_id=list(embedded.eos_token_ids), pad_token_id=embedded.pad_token_id)
    n = int(g.lengths[0])
    assert g.tokens[0, :n].tolist() == want[0, ids.shape[1] : ids.shape[1] + n].tolist()
    assert bool(g.stopped[0]) and int(want[0, ids.shape[1] + n]) in embedded.eos_token_ids
    assert "4" in embedded.decode_text(g.tokens, g.lengths)[0]
