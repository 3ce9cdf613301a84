"""Answer targets per task, and the answer log-probability against a plain transformers forward.

The reference tokenizes the whole decision reply itself (chat template text, prefix, answer) and
finds the answer's tokens by their character offsets, then runs the full transformers model, for a latent
row on a DynamicCache built from the row's real cache positions with an explicit attention mask
and positions; ``answer_logprobs`` must give the same numbers to 1e-4 in float32.
"""

import math
from dataclasses import replace

import pytest
import torch
from transformers import DynamicCache

from gcache.core.cache import latent_part
from gcache.core.latent import rollout
from gcache.core.objectives import answer_nll
from gcache.io.models.local import embedded_tokenizer, encode_chat, load_model, tiny_model
from gcache.io.runner.answers import (
    MAX_ANSWER_TOKENS,
    AnswerTarget,
    answer_inputs,
    answer_logprobs,
    answer_logprobs_shared,
    answer_target,
    answer_tokens,
)
from gcache.io.runner.communication import stack_contexts
from gcache.io.runner.prompts import agent_messages, agent_roles, answer_format, decision_messages
from gcache.io.tasks import extract
from gcache.io.tasks.contracts import answer_complete
from gcache.io.tasks.datasets import TASKS, Item, load_items, task_family
from gcache.io.tasks.scoring import score

# --------------------------------------------------------------------------- targets


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_a_target_in_the_format_its_prompts_ask_for_and_the_scorer_accepts(task):
    items = load_items(task, "test", limit=6) + load_items(task, "train", limit=2)
    for item in items:
        target = answer_target(item)
        assert target.prefix.rstrip() in answer_format(task)
        system = decision_messages(task, item.question)[0]["content"]
        assert target.prefix.rstrip() in system
        reply = target.prefix + target.answer
        if task_family(task) == "code":
            assert extract.extract_code(reply).strip() == item.gold.strip()
            assert answer_complete("code", reply + "\n")  # a line is complete at its newline
        else:
            verdict = score(item, reply)
            assert verdict.correct, (item.id, reply, verdict)
            assert answer_complete(task_family(task), reply + "\n")


def test_a_wrong_answer_on_the_same_line_is_scored_wrong():
    """The scorer is not trivially satisfied by the prefix: the target's answer is what counts."""
    item = load_items("gsm8k", "test", limit=1)[0]
    target = answer_target(item)
    assert not score(item, target.prefix + str(int(target.answer) + 1)).correct


def test_bad_items_are_refused():
    with pytest.raises(TypeError, match="item: expected"):
        answer_target({"task": "gsm8k", "gold": "3"})
    with pytest.raises(ValueError, match="item.gold"):
        answer_target(Item("x", "gsm8k", 0, "q", "  "))
    with pytest.raises(ValueError, match="unknown task"):
        answer_target(Item("x", "nope", 0, "q", "3"))


def offsets_split(tok, context, target):
    """Reference split of the whole reply's tokens by character offsets: the context's tokens,
    the prefix's (tokens ending within it), the answer's (tokens holding an answer character)."""
    text = context + target.prefix + target.answer
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, ends = enc["input_ids"], [end for _, end in enc["offset_mapping"]]
    in_context = [i for i, e in zip(ids, ends) if e <= len(context)]
    in_prefix = [i for i, e in zip(ids, ends) if len(context) < e <= len(context) + len(target.prefix)]
    in_answer = [i for i, e in zip(ids, ends) if e > len(context) + len(target.prefix)]
    return in_context, in_prefix, in_answer[:MAX_ANSWER_TOKENS]


@pytest.mark.parametrize("task", TASKS)
def test_the_answer_tokens_are_those_holding_the_answer_in_the_whole_reply(task):
    """Context, prefix and answer tokens as ``answer_inputs`` lays them out are the tokens of the
    whole reply, split where the character offsets say: the answer's tokens are the ones the
    model would write after the prefix."""
    tok = embedded_tokenizer()
    for item in load_items(task, "test", limit=40):
        target = answer_target(item)
        context = tok.apply_chat_template(decision_messages(task, item.question), add_generation_prompt=True, tokenize=False)
        want = offsets_split(tok, context, target)
        got = (tok(context, add_special_tokens=False)["input_ids"], *answer_tokens(tok, target))
        assert got == want, item.id
        assert tok.decode(got[2]).strip() == target.answer.strip() or len(got[2]) == MAX_ANSWER_TOKENS


def test_numbers_and_letters_split_where_the_answer_starts():
    tok = embedded_tokenizer()
    pieces = lambda ids: [tok.decode([i]) for i in ids]  # noqa: E731
    assert [pieces(x) for x in answer_tokens(tok, AnswerTarget("#### ", "42"))] == [["####", " "], ["4", "2"]]
    assert [pieces(x) for x in answer_tokens(tok, AnswerTarget("#### ", "-3"))] == [["####"], [" -", "3"]]
    assert [pieces(x) for x in answer_tokens(tok, AnswerTarget("Answer: ", "B"))] == [["Answer", ":"], [" B"]]


def test_long_answers_are_capped():
    tok = embedded_tokenizer()
    prefix_ids, answer_ids = answer_tokens(tok, AnswerTarget("```python\n", "x = 1\n" * 1000 + "```"))
    assert len(answer_ids) == MAX_ANSWER_TOKENS
    assert tok.decode(prefix_ids) == "```python\n"
    with pytest.raises(ValueError, match="target.answer"):
        answer_tokens(tok, AnswerTarget("####", ""))


# --------------------------------------------------------------------------- the reference


def reference_logprob(lm, conversation, item, cache=None, row=0):
    """Mean log-probability per answer token from the full transformers model, on its own
    tokenization of the context and, for a latent row, on a DynamicCache of the row's real
    positions with an explicit mask and positions continuing at the cache's next_pos."""
    tok = lm.tokenizer
    text = tok.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    in_context, in_prefix, answer = offsets_split(tok, text, answer_target(item))
    context = in_context + in_prefix
    ids = torch.tensor([context + answer])
    kwargs = {}
    if cache is not None:
        keep = cache.mask[row]
        layers = [(cache.keys[i, row : row + 1][:, :, keep], cache.values[i, row : row + 1][:, :, keep]) for i in range(cache.num_layers)]
        past = int(keep.sum())
        start = int(cache.next_pos[row])
        kwargs = dict(
            cache=DynamicCache(ddp_cache_data=layers),
            attention_mask=torch.ones(1, past + ids.shape[1], dtype=torch.long),
            position_ids=torch.arange(start, start + ids.shape[1])[None],
        )
    with torch.no_grad():
        logp = lm.model(input_ids=ids, **kwargs).logits.float().log_softmax(-1)[0]  # [S, V]
    n = len(context)
    return sum(float(logp[n + j - 1, t]) for j, t in enumerate(answer)) / len(answer)


def mixed_items():
    return [
        load_items("gsm8k", "test", limit=3)[2],
        load_items("medqa", "test", limit=1)[0],
        load_items("mbppplus", "test", limit=1)[0],
    ]


def latent_caches(lm, items, *, latent_steps=3):
    """One-row caches of an agent per item (a sliced latent-only cache for the first row), and None for the second."""
    roles = agent_roles("gsm8k", n=1)
    convs = [agent_messages(it.task, roles[0], it.question, latent=True) for it in items]
    ids, mask = encode_chat(lm, convs)
    cache = rollout(lm.fns, lm.realign, ids, mask, latent_steps=latent_steps).cache
    from gcache.core.cache import select_rows, trim_padding

    rows = [trim_padding(select_rows(cache, [b])) for b in range(len(items))]
    rows[0] = latent_part(rows[0], latent_steps, 4)
    rows[1] = None
    return rows


def check_text_and_latent(lm):
    items = mixed_items()
    convs = [decision_messages(it.task, it.question) for it in items]
    with torch.no_grad():
        text = answer_logprobs(lm, convs, [None] * len(items), items)
    assert text.shape == (len(items),)
    for b, (conv, item) in enumerate(zip(convs, items)):
        assert math.isclose(float(text[b]), reference_logprob(lm, conv, item), abs_tol=1e-4)
    caches = latent_caches(lm, items)
    convs = [decision_messages(it.task, it.question, latent=c is not None) for it, c in zip(items, caches)]
    with torch.no_grad():
        latent = answer_logprobs(lm, convs, caches, items)
    for b, (conv, item, c) in enumerate(zip(convs, items, caches)):
        assert math.isclose(float(latent[b]), reference_logprob(lm, conv, item, c), abs_tol=1e-4), b
    assert bool((latent <= 0).all())
    return latent


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny(request):
    return tiny_model(request.param, seed=0)


def test_answer_logprobs_equal_a_plain_transformers_forward_on_text_and_latent_contexts(tiny):
    check_text_and_latent(tiny)


@pytest.mark.slow
def test_answer_logprobs_equal_a_plain_transformers_forward_on_the_embedded_model():
    lm = load_model("smollm2-135m", dtype="float32")
    check_text_and_latent(lm)


def test_the_fuser_objective_is_minus_the_mean_and_gets_gradients_from_the_same_forward(tiny):
    items = mixed_items()
    caches = latent_caches(tiny, items)
    caches[1] = caches[2]
    convs = [decision_messages(it.task, it.question, latent=True) for it in items]
    leaves = [c._replace(keys=c.keys.detach().requires_grad_(True)) for c in caches]
    lp = answer_logprobs(tiny, convs, leaves, items)
    nll = answer_nll(tiny.fns, stack_contexts(tiny, leaves), answer_inputs(tiny, convs, items))
    assert float(nll.detach()) == float(-lp.detach().mean())
    (-lp.mean()).backward()
    for c in leaves:
        assert c.keys.grad is not None and float(c.keys.grad.abs().sum()) > 0
        assert bool(torch.isfinite(c.keys.grad).all())


def test_answers_scored_on_a_shared_context_equal_the_context_repeated_per_answer(tiny):
    """Several answers per context (gold, other numbers, a negative one whose first token holds the
    prefix's space, letters and programs) read on a context prompt read once: values and cache
    gradients equal those of answer_logprobs over the repeated contexts, contexts in any order."""
    items = mixed_items()
    caches = latent_caches(tiny, items)
    convs = [decision_messages(it.task, it.question, latent=c is not None) for it, c in zip(items, caches)]
    math_item = items[0]
    answers = [math_item, replace(math_item, gold="-3"), replace(math_item, gold="1250.5"), items[1],
               replace(items[1], gold="A"), items[2], replace(math_item, gold="7")]  # fmt: skip
    contexts = [0, 0, 0, 1, 1, 2, 0]
    leaves = [None if c is None else c._replace(keys=c.keys.detach().requires_grad_(True)) for c in caches]
    shared = answer_logprobs_shared(tiny, convs, leaves, answers, contexts)
    shared.sum().backward()
    got_grads = [None if c is None else c.keys.grad.clone() for c in leaves]
    leaves = [None if c is None else c._replace(keys=c.keys.detach().requires_grad_(True)) for c in caches]
    repeated = answer_logprobs(tiny, [convs[c] for c in contexts], [leaves[c] for c in contexts], answers)
    repeated.sum().backward()
    torch.testing.assert_close(shared, repeated, atol=1e-5, rtol=0)
    for got, c in zip(got_grads, leaves):
        if c is not None:
            assert float(got.abs().sum()) > 0
            torch.testing.assert_close(got, c.keys.grad, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"contexts: expected indices in \[0, 3\)"):
        answer_logprobs_shared(tiny, convs, caches, answers[:2], [0, 3])
    with pytest.raises(ValueError, match="contexts: expected one context index per item"):
        answer_logprobs_shared(tiny, convs, caches, answers[:2], [0])


def test_an_overlong_reference_gives_a_finite_logprob_over_the_capped_tokens(tiny):
    item = Item("mbpp/long", "mbppplus", 0, "Write f.", "def f():\n" + "    x = 1\n" * 2000)
    convs = [decision_messages("mbppplus", item.question)]
    batch = answer_inputs(tiny, convs, [item])
    assert int(batch.target_mask.sum()) == MAX_ANSWER_TOKENS
    with torch.no_grad():
        lp = answer_logprobs(tiny, convs, [None], [item])
    assert bool(torch.isfinite(lp).all()) and float(lp[0]) <= 0


def test_mismatched_rows_are_refused(tiny):
    items = mixed_items()
    convs = [decision_messages(it.task, it.question) for it in items]
    with pytest.raises(ValueError, match="items: expected one item per conversation"):
        answer_logprobs(tiny, convs, [None] * 3, items[:2])
    with pytest.raises(ValueError, match="caches: expected one cache"):
        answer_logprobs(tiny, convs, [None] * 2, items)
    caches = latent_caches(tiny, items)
    two_rows = stack_contexts(tiny, [caches[0], caches[2]])
    with pytest.raises(ValueError, match=r"caches\[0\]: expected a cache of one row"):
        answer_logprobs(tiny, convs, [two_rows, None, None], items)


@pytest.mark.parametrize("decode_step", ["dynamic", "static"])
def test_answer_lines_read_on_the_decodes_prompt_equal_the_context_read_again(decode_step):
    """The answer and margin read on what the local decode kept of each context (its prompt but the
    last token) equal the same contexts read afresh, for rows that end at different steps (the
    dynamic loop parks the first ones) and contexts with and without a cache; a read that does not
    end where its context does is refused."""
    from gcache.core.latent import Decoding
    from gcache.io.models.generation import generate_local
    from gcache.io.runner.margin import answer_scores

    lm = tiny_model("llama", seed=0, decode_step=decode_step)
    items = mixed_items()
    items[0] = replace(items[0], meta={"distractors": ["7", "-3"]})
    caches = latent_caches(lm, items)
    convs = [decision_messages(it.task, it.question, latent=c is not None) for it, c in zip(items, caches)]
    ends = torch.tensor([1, 4, 2])  # row b stops after ends[b] tokens

    def stop(tokens, running):
        return torch.full_like(running, False) | (tokens.shape[1] >= ends)

    with torch.no_grad():
        texts = generate_local(lm, convs, Decoding(max_new_tokens=6, stop=stop), cache=stack_contexts(lm, caches))
        assert [t.generated_tokens for t in texts] == ends.tolist()
        reads = [t.read for t in texts]
        assert all(r is not None and r.batch_size == 1 for r in reads)
        got, got_margins = answer_scores(lm, convs, caches, items, reads=reads)
        want, want_margins = answer_scores(lm, convs, caches, items)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert got_margins[0] == pytest.approx(want_margins[0], abs=1e-5) and got_margins[1:] == want_margins[1:] == [None, None]
    shifted = reads[1]._replace(next_pos=reads[1].next_pos + 1)
    with pytest.raises(ValueError, match=r"reads\[1\]: expected one row ending at position"):
        answer_logprobs_shared(lm, convs, caches, items, [0, 1, 2], reads=[reads[0], shifted, reads[2]])
