"""Realignment: the ridge least-squares solution, the identity on tied embeddings, norm matching."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gcache.core.realign import Realign, apply_realign, identity_realign, realign_params


def _embeddings(vocab: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, dim, generator=g), torch.randn(vocab, dim, generator=g)


def test_tied_embeddings_give_the_identity():
    w, _ = _embeddings(2000, 32, 0)
    params = realign_params(w, w)
    assert params.matrix.shape == (32, 32) and params.matrix.dtype == torch.float32
    assert torch.allclose(params.matrix, torch.eye(32), atol=1e-3)


def test_tiny_model_tied_embeddings_give_the_identity():
    from gcache.io.models.local import tiny_model

    lm = tiny_model("qwen3")
    assert lm.model.config.tie_word_embeddings
    assert torch.allclose(lm.realign.matrix, torch.eye(64), atol=1e-3)


@pytest.mark.parametrize("reg", [0.0, 1e-5, 10.0])
def test_matrix_is_the_ridge_least_squares_solution(reg):
    """Brute force in float64: W_a minimises ||W_out W_a - W_in||^2 + reg ||W_a||^2, whose gradient vanishes."""
    w_in, w_out = _embeddings(300, 8, 1)
    params = realign_params(w_in, w_out, reg=reg)
    a, wi, wo = params.matrix.double(), w_in.double(), w_out.double()
    grad = wo.T @ (wo @ a - wi) + reg * a
    assert float(grad.abs().max()) < 1e-6 * float((wo.T @ wi).abs().max())
    # and it agrees with the normal equations solved independently by lstsq on the stacked system
    stacked = torch.cat([wo, (reg**0.5) * torch.eye(8, dtype=torch.float64)])
    target = torch.cat([wi, torch.zeros(8, 8, dtype=torch.float64)])
    ref = torch.linalg.lstsq(stacked, target).solution
    assert torch.allclose(a, ref, atol=1e-4)


def test_target_norm_is_the_mean_input_row_norm():
    w_in, w_out = _embeddings(50, 4, 2)
    want = sum(float(row.norm()) for row in w_in) / 50
    assert abs(float(realign_params(w_in, w_out).target_norm) - want) < 1e-5
    assert abs(float(identity_realign(w_in).target_norm) - want) < 1e-5


@given(
    h=st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=8, max_size=8).filter(
        lambda v: sum(x * x for x in v) > 1e-6
    ),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]),
)
def test_realigned_vector_has_the_target_norm_and_dtype(h, dtype):
    w_in, w_out = _embeddings(100, 8, 3)
    params = realign_params(w_in, w_out)
    x = torch.tensor(h, dtype=dtype)
    y = apply_realign(params, x)
    assert y.dtype == dtype and y.shape == x.shape
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(float(y.float().norm()) / float(params.target_norm) - 1) < tol
    # direction: h @ W_a, up to the positive rescaling
    direction = x.double() @ params.matrix.double()
    cos = torch.nn.functional.cosine_similarity(y.double(), direction, dim=0)
    assert float(cos) > 1 - tol


def test_identity_realign_only_rescales_batched_input():
    w_in, _ = _embeddings(100, 8, 4)
    params = identity_realign(w_in)
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    y = apply_realign(params, x)
    assert y.shape == (3, 5, 8)
    assert torch.allclose(y.norm(dim=-1), params.target_norm.expand(3, 5), atol=1e-5)
    assert torch.allclose(y / y.norm(dim=-1, keepdim=True), x / x.norm(dim=-1, keepdim=True), atol=1e-6)


def test_zero_vector_stays_finite():
    params = identity_realign(torch.ones(10, 4))
    y = apply_realign(params, torch.zeros(2, 4))
    assert torch.equal(y, torch.zeros(2, 4))


def test_bad_shapes_raise_naming_the_argument():
    w_in, w_out = _embeddings(10, 4, 5)
    with pytest.raises(ValueError, match=r"w_in and w_out.*\(10, 4\).*\(10, 3\)"):
        realign_params(w_in, w_out[:, :3])
    with pytest.raises(ValueError, match="w_in"):
        realign_params(w_in[0], w_out)
    with pytest.raises(ValueError, match="reg"):
        realign_params(w_in, w_out, reg=-1.0)
    with pytest.raises(ValueError, match=r"h: expected last axis of size d = 4"):
        apply_realign(realign_params(w_in, w_out), torch.zeros(2, 5))
    with pytest.raises(TypeError, match="w_in"):
        identity_realign([[1.0]])
    assert isinstance(realign_params(w_in, w_out), Realign)
