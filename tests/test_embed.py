"""Sentence embeddings: the shipped MiniLM encoder, the role-embedding cache, cache folder rules, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gcache.io.models import embed

PROFILES = [
    "You are a careful mathematician who checks every arithmetic step.",
    "You are a critic who looks for flaws in the other agents' reasoning.",
    "You are a programmer who writes short, correct Python functions.",
]


class _RefusingEncoder:
    """Fails the test if anything asks it to embed: proves a value came from the cache."""

    def encode(self, *args, **kwargs):
        raise AssertionError("the encoder was called for a cached text")


@pytest.fixture()
def cache_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GCACHE_CACHE_DIR", str(tmp_path))
    embed.clear_memory_cache()
    yield tmp_path
    embed.clear_memory_cache()


def test_cache_folder_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("GCACHE_CACHE_DIR", str(tmp_path / "g"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert embed.embeddings_dir() == tmp_path / "g" / "embeddings"
    monkeypatch.delenv("GCACHE_CACHE_DIR")
    assert embed.embeddings_dir() == tmp_path / "x" / "gcache" / "embeddings"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert embed.embeddings_dir() == tmp_path / "h" / ".cache" / "gcache" / "embeddings"


def test_keys_depend_on_the_text():
    assert embed.text_key("a") == embed.text_key("a") != embed.text_key("b")


def test_bad_input(cache_root):
    with pytest.raises(ValueError, match="profiles"):
        embed.role_embeddings([])
    with pytest.raises(TypeError, match="profiles"):
        embed.role_embeddings("one string, not a list")
    with pytest.raises(TypeError, match="texts"):
        embed.embed_texts([1, 2])
    with pytest.raises(TypeError, match="question"):
        embed.question_features(PROFILES, None)
    assert embed.embed_texts([]).shape == (0, 384)


@pytest.mark.slow
def test_minilm_embeddings_are_unit_norm_and_meaningful():
    out = embed.embed_texts(["How many apples are left?", "How many apples remain?", "Sort a list in Python."])
    assert out.shape == (3, embed.EMBED_DIM) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    sims = out @ out.T
    assert sims[0, 1] > sims[0, 2] + 0.2
    torch.testing.assert_close(embed.embed_texts(["How many apples are left?"])[0], out[0], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_role_embeddings_are_cached_on_disk_and_in_memory(cache_root):
    first = embed.role_embeddings(PROFILES + [PROFILES[0]])
    assert first.shape == (4, 384) and torch.equal(first[0], first[3])
    files = sorted((cache_root / "embeddings").glob("*.safetensors"))
    assert len(files) == 3
    torch.testing.assert_close(first[:3], embed.embed_texts(PROFILES), atol=1e-5, rtol=0)
    # From memory, then (after forgetting memory) from disk: the encoder is never asked again.
    assert torch.equal(embed.role_embeddings(PROFILES, encoder=_RefusingEncoder()), first[:3])
    embed.clear_memory_cache()
    assert torch.equal(embed.role_embeddings(PROFILES, encoder=_RefusingEncoder()), first[:3])
    # A corrupt file is recomputed, not trusted.
    files[0].write_bytes(b"garbage")
    embed.clear_memory_cache()
    again = embed.role_embeddings(PROFILES)
    torch.testing.assert_close(again, first[:3], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_question_features_feed_the_policy(cache_root):
    from gcache.core import policy as pl
    from gcache.core import topology as tp

    feats = embed.question_features(PROFILES, "What is 12 * 7?")
    assert feats.shape == (3, 768)
    assert torch.equal(feats[0, 384:], feats[2, 384:])
    config = tp.TopologyConfig(num_agents=3)
    params = pl.init_policy(config, 768, torch.Generator().manual_seed(0))
    probs = pl.edge_probs(params, feats, ~torch.eye(3, dtype=torch.bool))
    assert probs.shape == (3, 3) and torch.isfinite(probs).all()
