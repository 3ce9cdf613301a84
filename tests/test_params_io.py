"""Round trips of NamedTuples of tensors through safetensors, and clear errors on mismatch."""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

from gcache.core import optim
from gcache.core import policy as pl
from gcache.core import topology as tp
from gcache.io.records.params import load_params, save_params


class Other(NamedTuple):
    weight: torch.Tensor


def _policy() -> tuple[tp.TopologyConfig, pl.PolicyParams]:
    config = tp.TopologyConfig(num_agents=3, num_rounds=2)
    return config, pl.init_policy(config, 10, torch.Generator().manual_seed(0))


def test_policy_params_round_trip(tmp_path):
    config, params = _policy()
    params = params._replace(temporal_logits=torch.randn(3, 3), log_scale=torch.tensor(0.7))
    path = save_params(tmp_path / "policy.safetensors", params)
    for like in (pl.PolicyParams, params):
        back = load_params(path, like)
        assert type(back) is pl.PolicyParams
        for a, b in zip(params, back):
            assert torch.equal(a, b) and a.dtype == b.dtype
    assert [p.name for p in tmp_path.iterdir()] == ["policy.safetensors"]  # no temporary left behind


def test_nested_optimizer_state_round_trip(tmp_path):
    _, params = _policy()
    opt = optim.adam(0.01)
    state = opt.init(params)
    grads = pl.PolicyParams(*(torch.randn_like(p) for p in params))
    _, state = opt.update(grads, state, params)
    save_params(tmp_path / "adam.safetensors", state)
    back = load_params(tmp_path / "adam.safetensors", opt.init(params))
    assert isinstance(back, optim.AdamState) and isinstance(back.mu, pl.PolicyParams)
    for a, b in zip(optim.tree_leaves(state), optim.tree_leaves(back)):
        assert torch.equal(a, b)
    # Training resumes identically from the reloaded state.
    u1, _ = opt.update(grads, state, params)
    u2, _ = opt.update(grads, back, params)
    for a, b in zip(u1, u2):
        assert torch.equal(a, b)


def test_dict_of_tensors_round_trip(tmp_path):
    params = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3, dtype=torch.float64)}
    save_params(tmp_path / "d.safetensors", params)
    back = load_params(tmp_path / "d.safetensors", {"w": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.float64)})
    assert back.keys() == params.keys() and all(torch.equal(params[k], back[k]) for k in params)


def test_overwrite_is_atomic_and_replaces(tmp_path):
    _, params = _policy()
    path = tmp_path / "p.safetensors"
    save_params(path, params)
    changed = params._replace(bias=torch.tensor(3.0))
    save_params(path, changed)
    assert load_params(path, pl.PolicyParams).bias.item() == 3.0
    assert sorted(os.listdir(tmp_path)) == ["p.safetensors"]


def test_mismatches_raise_clear_errors(tmp_path):
    config, params = _policy()
    path = save_params(tmp_path / "p.safetensors", params)
    with pytest.raises(ValueError, match="expected a Other"):
        load_params(path, Other)
    bigger = pl.init_policy(tp.TopologyConfig(num_agents=4), 10, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="temporal_logits: expected shape"):
        load_params(path, bigger)
    with pytest.raises(ValueError, match="dtype"):
        load_params(path, pl.PolicyParams(*(p.double() for p in params)))
    state_path = save_params(tmp_path / "s.safetensors", optim.adam().init(params))
    with pytest.raises(ValueError, match="template"):
        load_params(state_path, optim.AdamState)
    with pytest.raises(ValueError, match="path"):
        load_params(tmp_path / "missing.safetensors", pl.PolicyParams)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="path"):
        load_params(junk, pl.PolicyParams)
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match="save_params"):
        load_params(tmp_path / "foreign.safetensors", Other)
    with pytest.raises(TypeError, match="params"):
        save_params(tmp_path / "bad.safetensors", [torch.zeros(1)])
    with pytest.raises(TypeError, match="params"):
        save_params(tmp_path / "bad.safetensors", Other(weight=1.0))
    with pytest.raises(ValueError, match="keys"):
        save_params(tmp_path / "bad.safetensors", {"a.b": torch.zeros(1)})
    with pytest.raises(TypeError, match="like"):
        load_params(path, "PolicyParams")
    assert not (tmp_path / "bad.safetensors").exists()
