"""Pure optimizers: equivalence with torch.optim, purity, tree handling, bad input."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gcache.core import optim


class Pair(NamedTuple):
    weight: torch.Tensor  # [3, 2]
    bias: torch.Tensor  # [2]


def _quadratic_grads(params: Pair, target: Pair) -> Pair:
    return Pair(*(2 * (p - t) for p, t in zip(params, target)))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), lr=st.floats(1e-3, 0.5), b1=st.floats(0.0, 0.99), b2=st.floats(0.5, 0.9999))
def test_adam_matches_torch_optim_adam(seed, lr, b1, b2):
    g = torch.Generator().manual_seed(seed)
    params = Pair(torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64))
    target = Pair(torch.randn(3, 2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64))
    reference = [p.clone().requires_grad_() for p in params]
    torch_adam = torch.optim.Adam(reference, lr=lr, betas=(b1, b2), eps=1e-8)
    opt = optim.adam(lr, b1, b2, 1e-8)
    state = opt.init(params)
    for _ in range(5):
        grads = _quadratic_grads(params, target)
        updates, state = opt.update(grads, state, params)
        params = optim.apply_updates(params, updates)
        torch_adam.zero_grad()
        for r, grad in zip(reference, _quadratic_grads(Pair(*reference), target)):
            r.grad = grad.detach().clone()
        torch_adam.step()
    for mine, theirs in zip(params, reference):
        torch.testing.assert_close(mine, theirs.detach(), rtol=1e-10, atol=1e-12)
    assert int(state.count) == 5


def test_adam_is_pure_and_keeps_structure():
    params = {"a": torch.ones(2), "b": Pair(torch.zeros(3, 2), torch.ones(2))}
    grads = {"a": torch.full((2,), 0.5), "b": Pair(torch.ones(3, 2), torch.ones(2))}
    snapshot = optim.tree_map(torch.clone, (params, grads))
    opt = optim.adam()
    state = opt.init(params)
    state_snapshot = optim.tree_map(torch.clone, state)
    updates, new_state = opt.update(grads, state, params)
    new_params = optim.apply_updates(params, updates)
    assert isinstance(new_params["b"], Pair) and isinstance(new_state, optim.AdamState)
    for x, y in zip(optim.tree_leaves((params, grads)), optim.tree_leaves(snapshot)):
        assert torch.equal(x, y)
    for x, y in zip(optim.tree_leaves(state), optim.tree_leaves(state_snapshot)):
        assert torch.equal(x, y)
    # First Adam step moves each coordinate by lr against the sign of its gradient.
    torch.testing.assert_close(new_params["a"], torch.ones(2) - 0.1)
    replay, _ = opt.update(grads, state, params)
    for x, y in zip(optim.tree_leaves(updates), optim.tree_leaves(replay)):
        assert torch.equal(x, y)


def test_adam_minimizes_a_quadratic():
    target = Pair(torch.randn(3, 2), torch.randn(2))
    params = Pair(torch.zeros(3, 2), torch.zeros(2))
    opt = optim.adam(0.05)
    state = opt.init(params)
    for _ in range(400):
        updates, state = opt.update(_quadratic_grads(params, target), state)
        params = optim.apply_updates(params, updates)
    for p, t in zip(params, target):
        torch.testing.assert_close(p, t, atol=1e-2, rtol=0)


def test_apply_updates_keeps_requires_grad():
    p = torch.zeros(2, requires_grad=True)
    new = optim.apply_updates({"p": p}, {"p": torch.ones(2)})["p"]
    assert new.requires_grad and new.is_leaf and torch.equal(new.detach(), torch.ones(2))
    assert torch.equal(p.detach(), torch.zeros(2))


def test_sgd_step():
    updates, state = optim.sgd(0.5).update(Pair(torch.ones(3, 2), torch.ones(2)), ())
    assert state == () and torch.equal(updates.bias, torch.full((2,), -0.5))


def test_bad_input():
    for kwargs, name in [({"lr": 0.0}, "lr"), ({"lr": -1.0}, "lr"), ({"b1": 1.0}, "b1"), ({"b2": -0.1}, "b2"),
                         ({"eps": 0.0}, "eps")]:
        with pytest.raises(ValueError, match=name):
            optim.adam(**kwargs)
    with pytest.raises(ValueError, match="lr"):
        optim.sgd(0)
    with pytest.raises(TypeError, match="tree_map"):
        optim.adam().init({"a": 1.0})
    with pytest.raises(ValueError, match="structures differ"):
        optim.apply_updates({"a": torch.ones(1)}, {"b": torch.ones(1)})
