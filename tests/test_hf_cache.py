"""GrowingLayer (in-place appends into spare capacity) behaves exactly like transformers' DynamicLayer.

Reference: DynamicLayer fed the same chunks and the same crops and batch selections; and,
through a model, transformers' own generate (which uses plain DynamicCaches).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.cache_utils import DynamicLayer

from gcache.core.latent import Decoding, generate, rollout
from gcache.io.models.hf import GrowingLayer, growing_cache
from gcache.io.models.local import tiny_model
from tests._latent_helpers import conversations

B, H, D = 3, 2, 4

# An operation is ("append", length), ("crop", tokens) or ("select", row order).
ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 300)),
        st.tuples(st.just("append"), st.just(1)),
        st.tuples(st.just("crop"), st.integers(1, 20)),
        st.tuples(st.just("select"), st.permutations(range(B))),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops=ops, seed=st.integers(0, 2**16))
def test_growing_layer_equals_dynamic_layer(ops, seed):
    gen = torch.Generator().manual_seed(seed)
    grow, ref = GrowingLayer(), DynamicLayer()
    given_states = []
    for op, arg in ops:
        if op == "append":
            k, v = torch.randn(B, H, arg, D, generator=gen), torch.randn(B, H, arg, D, generator=gen)
            given_states.append((k, k.clone(), v, v.clone()))
            got, want = grow.update(k, v), ref.update(k, v)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        elif op == "crop" and ref.get_seq_length() > arg:
            grow.crop(-arg)
            ref.crop(-arg)
        elif op == "select" and ref.get_seq_length():
            rows = torch.tensor(arg)
            grow.batch_select_indices(rows)
            ref.batch_select_indices(rows)
        assert grow.get_seq_length() == ref.get_seq_length()
        if ref.get_seq_length():
            assert torch.equal(grow.keys, ref.keys) and torch.equal(grow.values, ref.values)
    # what was handed to update is never written afterwards
    for k, k0, v, v0 in given_states:
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_appends_reuse_the_buffer_until_it_is_full():
    layer = GrowingLayer()
    layer.update(torch.zeros(1, 1, 10, 2), torch.zeros(1, 1, 10, 2))
    buffer = layer.keys.data_ptr()
    for _ in range(256):
        layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert layer.keys.data_ptr() == buffer  # 10 + 256 positions fit the first allocation
    layer.update(torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert layer.keys.data_ptr() != buffer
    assert layer.get_seq_length() == 267 and float(layer.keys.sum()) == 2 * 257


def test_gradients_flow_through_a_growing_cache():
    keys = torch.randn(B, H, 5, D, requires_grad=True)
    values = torch.randn(B, H, 5, D, requires_grad=True)
    state = growing_cache(layers=[(keys, values)])
    new_k, new_v = state.layers[0].update(torch.randn(B, H, 1, D), torch.randn(B, H, 1, D))
    (new_k.sum() + 2 * new_v.sum()).backward()
    assert torch.equal(keys.grad, torch.ones_like(keys))
    assert torch.equal(values.grad, torch.full_like(values, 2.0))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_long_generation_across_reallocations_equals_transformers(arch):
    # 300 new tokens outgrow the first buffer (prompt + 256), so decoding crosses a reallocation.
    lm = tiny_model(arch, seed=1)
    ids, mask = lm.encode_chat(conversations(["Count slowly."]))
    got = generate(lm.fns, ids, mask, Decoding(300), eos_token_ids=[])
    want = lm.model.generate(
        ids, attention_mask=mask.long(), max_new_tokens=300, min_new_tokens=300, do_sample=False,
        pad_token_id=lm.pad_token_id,
    )
    assert got.tokens[0].tolist() == want[0, ids.shape[1]:].tolist()


def test_rollout_leaves_the_incoming_cache_untouched():
    lm = tiny_model("llama", seed=2)
    ids, mask = lm.encode_chat(conversations(["Hello there"]))
    first = rollout(lm.fns, lm.realign, ids, mask, latent_steps=3).cache
    keys, values = first.keys.clone(), first.values.clone()
    rollout(lm.fns, lm.realign, ids, mask, cache=first, latent_steps=3)
    assert torch.equal(first.keys, keys) and torch.equal(first.values, values)
