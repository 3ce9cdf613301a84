"""Pure gradient transformations (optax-style) over trees of tensors.

A tree is a Tensor, a NamedTuple, tuple, list or dict of trees (``PolicyParams``,
a dict of fuser weights, ...). A transformation is a pair of pure functions::

    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = apply_updates(params, updates)          # params + updates, new tensors

Nothing is mutated: every call returns new tensors, so a training step is
``(params, state) -> (params, state)`` and can be replayed or saved
(gcache/io/records/params.py saves any NamedTuple of tensors, ``AdamState`` included).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

Params = Any  # a tree of tensors
Updates = Any  # a tree of tensors shaped like Params
State = Any


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None) -> (updates, state)``."""

    init: Callable[[Params], State]
    update: Callable[..., tuple[Updates, State]]


class AdamState(NamedTuple):
    """Adam's state: step count [] long, first and second moments shaped like the params."""

    count: Tensor  # [] long
    mu: Params
    nu: Params


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Apply ``fn`` to the tensors of ``tree`` (and the matching leaves of ``rest``), keeping its structure.

    Raises TypeError on a leaf that is not a Tensor, ValueError on trees of different structure.
    """
    if isinstance(tree, Tensor):
        for other in rest:
            if not isinstance(other, Tensor):
                raise ValueError(f"tree_map: structures differ, a Tensor faces {type(other).__name__}")
        return fn(tree, *rest)
    if isinstance(tree, dict):
        for other in rest:
            if not isinstance(other, dict) or other.keys() != tree.keys():
                raise ValueError("tree_map: structures differ (dict keys)")
        return {k: tree_map(fn, v, *(o[k] for o in rest)) for k, v in tree.items()}
    if isinstance(tree, (tuple, list)):
        for other in rest:
            if type(other) is not type(tree) or len(other) != len(tree):
                raise ValueError(f"tree_map: structures differ ({type(tree).__name__} of {len(tree)})")
        mapped = [tree_map(fn, *leaves) for leaves in zip(tree, *rest)]
        if hasattr(tree, "_fields"):
            return type(tree)(*mapped)
        return type(tree)(mapped)
    raise TypeError(f"tree_map: expected a Tensor, NamedTuple, tuple, list or dict, got {type(tree).__name__}")


def tree_leaves(tree: Any) -> list[Tensor]:
    """The tensors of a tree, in structure order."""
    leaves: list[Tensor] = []
    tree_map(leaves.append, tree)
    return leaves


def apply_updates(params: Params, updates: Updates) -> Params:
    """New params = params + updates (out of place; the result keeps each param's requires_grad)."""

    def add(p: Tensor, u: Tensor) -> Tensor:
        with torch.no_grad():
            new = p + u.to(p.dtype)
        return new.requires_grad_(p.requires_grad)

    return tree_map(add, params, updates)


def value_and_grad(loss_fn: Callable[[Params], tuple[Tensor, Any]], params: Params) -> tuple[Tensor, Any, Updates]:
    """(loss, aux, grads) of ``loss_fn(params) -> (scalar loss, aux)`` with respect to ``params`` only.

    The params are re-leafed (detached copies that record gradients), so the caller's tensors are
    untouched and nothing else (a frozen model's weights) receives a ``.grad``; a leaf the loss does
    not depend on gets zeros. The loss comes back detached.
    """
    leaves = tree_map(lambda t: t.detach().requires_grad_(True), params)
    loss, aux = loss_fn(leaves)
    flat = tree_leaves(leaves)
    if loss.requires_grad:
        found = torch.autograd.grad(loss, flat, allow_unused=True)
    else:
        found = (None,) * len(flat)
    grads = iter([torch.zeros_like(t) if g is None else g for t, g in zip(flat, found)])
    return loss.detach(), aux, tree_map(lambda _: next(grads), params)


def _check_hyper(name: str, value: float, low: float, high: float, *, closed_low: bool) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and (low <= value if closed_low else low < value) and value < high
    if not ok:
        bracket = "[" if closed_low else "("
        raise ValueError(f"{name}: expected a number in {bracket}{low}, {high}), got {value!r}")
    return float(value)


def adam(lr: float = 0.1, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam (Kingma & Ba) with bias correction; updates are ``-lr * mu_hat / (sqrt(nu_hat) + eps)``.

    The default lr 0.1 is the seed system's. Raises ValueError on hyperparameters out of range.
    """
    lr = _check_hyper("lr", lr, 0.0, float("inf"), closed_low=False)
    b1 = _check_hyper("b1", b1, 0.0, 1.0, closed_low=True)
    b2 = _check_hyper("b2", b2, 0.0, 1.0, closed_low=True)
    eps = _check_hyper("eps", eps, 0.0, float("inf"), closed_low=False)

    def init(params: Params) -> AdamState:
        def zeros(p: Tensor) -> Tensor:
            return torch.zeros_like(p, memory_format=torch.contiguous_format).detach()

        first = tree_leaves(params)
        device = first[0].device if first else None
        return AdamState(count=torch.zeros((), dtype=torch.long, device=device),
                         mu=tree_map(zeros, params), nu=tree_map(zeros, params))

    def update(grads: Updates, state: AdamState, params: Params | None = None) -> tuple[Updates, AdamState]:
        del params  # Adam needs no params; kept for the common signature.
        with torch.no_grad():
            count = state.count + 1
            mu = tree_map(lambda m, g: b1 * m + (1 - b1) * g.detach(), state.mu, grads)
            nu = tree_map(lambda v, g: b2 * v + (1 - b2) * g.detach().square(), state.nu, grads)
            step = int(count)
            correction1 = 1 - b1**step
            correction2 = 1 - b2**step
            updates = tree_map(
                lambda m, v: -lr * (m / correction1) / ((v / correction2).sqrt() + eps), mu, nu
            )
        return updates, AdamState(count=count, mu=mu, nu=nu)

    return GradientTransformation(init, update)


def sgd(lr: float) -> GradientTransformation:
    """Plain gradient descent, ``updates = -lr * grads``; state is an empty tuple."""
    lr = _check_hyper("lr", lr, 0.0, float("inf"), closed_low=False)

    def init(params: Params) -> tuple:
        return ()

    def update(grads: Updates, state: tuple, params: Params | None = None) -> tuple[Updates, tuple]:
        with torch.no_grad():
            return tree_map(lambda g: -lr * g.detach(), grads), state

    return GradientTransformation(init, update)
