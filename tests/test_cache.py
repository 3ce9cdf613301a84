"""Properties of the KVCache transforms (hypothesis), and the DynamicCache round trip.

The strategies ``cache_dims`` and ``kv_caches`` are written to be moved as they
are into a public testing module.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcache.core.cache import (
    KVCache,
    check_compatible,
    concat,
    empty,
    keep_first,
    keep_last,
    latent_part,
    nbytes,
    select_rows,
    trim_padding,
    validate,
)
from gcache.io.models.hf import from_dynamic_cache, to_dynamic_cache
from gcache.testing import DTYPES, assert_caches_close, cache_dims, compatible_caches, kv_caches


def assert_same(a: KVCache, b: KVCache) -> None:
    """Equal shapes, dtypes and contents, field by field."""
    assert_caches_close(a, b, atol=0, rtol=0)


def snapshot(caches) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in c] for c in caches]


# --------------------------------------------------------------------------- properties


@given(compatible_caches(2))
def test_keep_last_of_concat_gives_the_second_part(pair):
    a, b = pair
    before = snapshot(pair)
    joined = concat([a, b])
    assert joined.seq_len == a.seq_len + b.seq_len
    tail = keep_last(joined, b.seq_len)
    assert_same(tail._replace(next_pos=b.next_pos), b)
    assert torch.equal(joined.next_pos, torch.maximum(a.next_pos, b.next_pos))
    n = a.seq_len
    head = KVCache(joined.keys[:, :, :, :n], joined.values[:, :, :, :n], joined.mask[:, :n], a.next_pos)
    assert_same(head, a)
    for c, snap in zip(pair, before):
        assert all(torch.equal(t, s) for t, s in zip(c, snap))


@given(compatible_caches(3))
def test_concat_is_associative(triple):
    a, b, c = triple
    left = concat([concat([a, b]), c])
    right = concat([a, concat([b, c])])
    flat = concat([a, b, c])
    assert_same(left, right)
    assert_same(left, flat)


@given(kv_caches(), st.integers(0, 8), st.integers(0, 8))
def test_truncations_compose(cache, n, m):
    twice = keep_last(keep_last(cache, n), m)
    assert_same(twice, keep_last(cache, min(n, m)))
    once = keep_last(cache, n)
    assert once.seq_len == min(n, cache.seq_len)
    assert once.keys.dtype == cache.keys.dtype and torch.equal(once.next_pos, cache.next_pos)
    assert torch.equal(once.keys, cache.keys[:, :, :, cache.seq_len - once.seq_len :])


@given(kv_caches())
def test_keep_all_and_concat_of_one_are_identity(cache):
    assert_same(keep_last(cache, cache.seq_len), cache)
    assert_same(keep_last(cache, cache.seq_len + 3), cache)
    assert_same(concat([cache]), cache)
    assert keep_last(cache, 0).seq_len == 0
    with pytest.raises(ValueError, match="n: expected a non-negative"):
        keep_last(cache, -1)


@given(kv_caches(), st.data())
def test_select_rows_picks_rows_in_order(cache, data):
    rows = data.draw(st.lists(st.integers(0, cache.batch_size - 1), max_size=5))
    picked = select_rows(cache, rows)
    assert picked.batch_size == len(rows)
    for i, r in enumerate(rows):
        assert torch.equal(picked.keys[:, i], cache.keys[:, r])
        assert torch.equal(picked.values[:, i], cache.values[:, r])
        assert torch.equal(picked.mask[i], cache.mask[r])
        assert int(picked.next_pos[i]) == int(cache.next_pos[r])
    perm = data.draw(st.permutations(list(range(cache.batch_size))))
    inverse = [perm.index(i) for i in range(cache.batch_size)]
    assert_same(select_rows(select_rows(cache, perm), inverse), cache)
    with pytest.raises(IndexError, match="rows"):
        select_rows(cache, [cache.batch_size])


@given(kv_caches(left_padded=True))
def test_trim_padding_keeps_every_real_position(cache):
    trimmed = trim_padding(cache)
    assert trimmed.seq_len <= cache.seq_len
    for b in range(cache.batch_size):
        assert torch.equal(trimmed.keys[:, b][:, :, trimmed.mask[b]], cache.keys[:, b][:, :, cache.mask[b]])
    if bool(cache.mask.any()):
        assert bool(trimmed.mask[:, 0].any())  # no column left that is padding in every row
    else:
        assert trimmed.seq_len == 0
    assert torch.equal(trimmed.next_pos, cache.next_pos)


@given(kv_caches())
def test_nbytes_counts_every_tensor(cache):
    item = cache.keys.element_size()
    want = 2 * cache.keys.numel() * item + cache.mask.numel() + 8 * cache.batch_size
    assert nbytes(cache) == want


@given(cache_dims(), st.sampled_from(DTYPES))
def test_empty_is_valid_and_neutral_for_concat(dims, dtype):
    layers, batch, heads, head_dim = dims
    e = validate(empty(layers, batch, heads, head_dim, dtype=dtype))
    assert e.seq_len == 0 and e.keys.dtype == dtype and int(e.next_pos.sum()) == 0


@given(compatible_caches(1))
def test_empty_is_a_unit_of_concat(one):
    (c,) = one
    e = empty(c.num_layers, c.batch_size, c.num_heads, c.head_dim, dtype=c.keys.dtype)
    assert_same(concat([e, c]), c)
    assert_same(concat([c, e]), c)


@given(kv_caches(min_len=1), kv_caches(min_len=1))
def test_concat_of_incompatible_caches_names_both_shapes(a, b):
    mismatch = tuple(a.keys.shape[i] for i in (0, 1, 2, 4)) != tuple(b.keys.shape[i] for i in (0, 1, 2, 4))
    if mismatch:
        with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] differ in shape") as err:
            concat([a, b])
        assert str(tuple(a.keys.shape)) in str(err.value) and str(tuple(b.keys.shape)) in str(err.value)
    elif a.keys.dtype != b.keys.dtype:
        with pytest.raises(ValueError, match="dtype"):
            concat([a, b])
    else:
        assert concat([a, b]).seq_len == a.seq_len + b.seq_len


def test_validate_and_check_compatible_reject_bad_caches():
    c = empty(2, 1, 2, 4)
    with pytest.raises(TypeError, match="cache: expected a KVCache"):
        validate((c.keys, c.values, c.mask, c.next_pos))
    with pytest.raises(ValueError, match=r"cache.keys: expected shape \[L, B, H, T, D\]"):
        validate(c._replace(keys=c.keys[0]))
    with pytest.raises(ValueError, match="mask"):
        validate(c._replace(mask=torch.zeros(2, 0, dtype=torch.bool)))
    with pytest.raises(TypeError, match="next_pos"):
        validate(c._replace(next_pos=c.next_pos.float()))
    with pytest.raises(ValueError, match=r"differ in shape.*\(2, 1, 2, 0, 4\).*\(3, 1, 2, 0, 4\)"):
        check_compatible(c, empty(3, 1, 2, 4))
    with pytest.raises(ValueError, match="caches: expected at least one"):
        concat([])


# --------------------------------------------------------------------------- DynamicCache round trip


@given(kv_caches(dtype=torch.float32))
def test_dynamic_cache_round_trip(cache):
    dc = to_dynamic_cache(cache)
    assert len(dc.layers) == cache.num_layers
    assert dc.get_seq_length() == cache.seq_len or cache.seq_len == 0
    assert_same(from_dynamic_cache(dc, cache.mask, cache.next_pos), cache)


def test_dynamic_cache_grows_without_touching_the_kvcache():
    g = torch.Generator().manual_seed(0)
    cache = KVCache(torch.randn(2, 1, 2, 3, 4, generator=g), torch.randn(2, 1, 2, 3, 4, generator=g),
                    torch.ones(1, 3, dtype=torch.bool), torch.tensor([3]))
    before = [t.clone() for t in cache]
    dc = to_dynamic_cache(cache)
    for layer in range(2):
        dc.update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4), layer)
    assert dc.get_seq_length() == 4
    assert all(torch.equal(t, s) for t, s in zip(cache, before))


@given(kv_caches(), st.integers(0, 8), st.integers(0, 8))
def test_latent_part_is_the_sink_then_the_latent_positions(cache, steps, sink):
    part = latent_part(cache, steps, sink)
    if sink + steps >= cache.seq_len:
        assert_same(part, cache)
    else:
        assert part.seq_len == sink + steps
        assert_same(keep_first(part, sink), keep_first(cache, sink))
        assert_same(keep_last(part, steps), keep_last(cache, steps))
    assert torch.equal(part.next_pos, cache.next_pos)


def test_latent_part_rejects_negative_counts():
    cache = empty(1, 1, 1, 2)
    with pytest.raises(ValueError, match="sink_positions"):
        latent_part(cache, 2, -1)


def test_stacking_rows_takes_any_row_counts_and_refuses_what_the_other_joins_refuse():
    """stack_rows, concat and fuse share one compatibility check: rows may differ only when
    stacking, and dtype and device are checked alike (stack_rows once skipped the device)."""
    from gcache.core.batch import stack_rows

    def cache(b, h=2, dtype=torch.float32, t=3):
        keys = torch.randn(2, b, h, t, 4, dtype=dtype)
        return KVCache(keys, keys.clone(), torch.ones(b, t, dtype=torch.bool), torch.full((b,), t))

    assert stack_rows([cache(1), cache(2, t=5)]).keys.shape[1] == 3
    with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] differ in shape: caches\[1\] has 3 KV heads"):
        stack_rows([cache(1), cache(1, h=3)])
    with pytest.raises(ValueError, match=r"caches\[0\] and caches\[1\] differ in dtype"):
        stack_rows([cache(1), cache(1, dtype=torch.float64)])
    with pytest.raises(ValueError, match="batch rows"):
        concat([cache(1), cache(2)])
