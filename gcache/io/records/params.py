"""Save and load NamedTuples of tensors (policy params, fuser params, optimizer state) as safetensors.

A tree is a NamedTuple, or a dict with string keys, whose leaves are tensors or
nested trees (``AdamState(count, mu=PolicyParams(...), nu=PolicyParams(...))``).
Tensors are stored under dotted paths (``mu.gcn_weight_1``); the file's metadata
holds the structure as JSON (``gcache.structure``: type names and field names,
in order), so loading checks that the file holds what the caller expects and
says what differs. Writes are atomic: a temporary file in the same folder,
fsync'ed, then renamed over the target, so a crash leaves the old file or the
new one, never a torn one.

    save_params(path, params)
    params = load_params(path, PolicyParams)          # a flat NamedTuple type
    state  = load_params(path, opt.init(params))      # a template instance: nesting, shapes, dtypes
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

_STRUCTURE_KEY = "gcache.structure"
_FORMAT_KEY = "gcache.format"
_FORMAT = "gcache-tree-1"


def _is_namedtuple(value: Any) -> bool:
    return isinstance(value, tuple) and hasattr(type(value), "_fields")


def _is_namedtuple_type(value: Any) -> bool:
    return isinstance(value, type) and issubclass(value, tuple) and hasattr(value, "_fields")


def _describe(tree: Any, path: str) -> dict:
    """JSON structure of a tree: {"tensor"}, {"namedtuple", type, fields: [[name, sub], ...]} or {"dict", ...}."""
    if isinstance(tree, Tensor):
        return {"kind": "tensor"}
    if _is_namedtuple(tree):
        items = list(zip(type(tree)._fields, tree))
        kind, name = "namedtuple", type(tree).__name__
    elif isinstance(tree, dict):
        for key in tree:
            if not isinstance(key, str) or not key or "." in key:
                raise ValueError(f"params{path}: dict keys must be non-empty strings without '.', got {key!r}")
        items, kind, name = list(tree.items()), "dict", "dict"
    else:
        raise TypeError(f"params{path}: expected a Tensor, NamedTuple or dict, got {type(tree).__name__}")
    return {"kind": kind, "type": name, "fields": [[key, _describe(value, f"{path}.{key}")] for key, value in items]}


def _flatten(tree: Any, prefix: str, out: dict[str, Tensor]) -> None:
    if isinstance(tree, Tensor):
        out[prefix] = tree.detach().to("cpu").contiguous().clone()
        return
    items = zip(type(tree)._fields, tree) if _is_namedtuple(tree) else tree.items()
    for key, value in items:
        _flatten(value, f"{prefix}.{key}" if prefix else key, out)


def save_params(path: str | os.PathLike, params: Any) -> Path:
    """Write a NamedTuple (or dict) of tensors, nested allowed, to ``path`` atomically; returns the path.

    Raises TypeError on a leaf that is not a tensor, ValueError on an unusable dict key.
    """
    if not (_is_namedtuple(params) or isinstance(params, dict)):
        raise TypeError(f"params: expected a NamedTuple or dict of tensors, got {type(params).__name__}")
    structure = _describe(params, "")
    tensors: dict[str, Tensor] = {}
    _flatten(params, "", tensors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {_FORMAT_KEY: _FORMAT, _STRUCTURE_KEY: json.dumps(structure)}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Path) -> tuple[dict[str, Tensor], dict]:
    if not path.is_file():
        raise ValueError(f"path: expected an existing safetensors file, got {str(path)!r}")
    try:
        tensors = load_file(path)
        with open(path, "rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_len))
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"path: {str(path)!r} is not a readable safetensors file ({err})") from err
    metadata = header.get("__metadata__") or {}
    if metadata.get(_FORMAT_KEY) != _FORMAT or _STRUCTURE_KEY not in metadata:
        raise ValueError(f"path: {str(path)!r} was not written by gcache.io.records.params.save_params (no structure metadata)")
    return tensors, json.loads(metadata[_STRUCTURE_KEY])


def _field_names(structure: dict) -> list[str]:
    return [name for name, _ in structure.get("fields", [])]


def _tensor(tensors: dict[str, Tensor], key: str, path: Path) -> Tensor:
    if key not in tensors:
        raise ValueError(f"{path}: {key}: listed in the structure metadata but missing from the file")
    return tensors[key]


def _build(structure: dict, like: Any, tensors: dict[str, Tensor], prefix: str, path: Path) -> Any:
    where = prefix or "<root>"
    if isinstance(like, Tensor):
        if structure.get("kind") != "tensor":
            raise ValueError(f"{path}: {where}: expected a tensor, the file holds a {structure.get('type')}")
        value = _tensor(tensors, prefix, path)
        if value.shape != like.shape:
            raise ValueError(f"{path}: {where}: expected shape {tuple(like.shape)}, the file holds {tuple(value.shape)}")
        if value.dtype != like.dtype:
            raise ValueError(f"{path}: {where}: expected dtype {like.dtype}, the file holds {value.dtype}")
        return value.to(like.device)
    if _is_namedtuple(like) or _is_namedtuple_type(like):
        cls = like if isinstance(like, type) else type(like)
        kind, names, expected_kind = cls.__name__, list(cls._fields), "namedtuple"
    else:
        cls, kind, names, expected_kind = dict, "dict", list(like.keys()), "dict"
    if structure.get("kind") != expected_kind or structure.get("type") != kind:
        raise ValueError(f"{path}: {where}: expected a {kind}, the file holds a {structure.get('type')}")
    if _field_names(structure) != names:
        raise ValueError(f"{path}: {where}: expected fields {names} of {kind}, the file holds {_field_names(structure)}")
    values = []
    for (name, sub), field in zip(structure["fields"], names):
        if isinstance(like, type):
            child = None
        else:
            child = getattr(like, field) if _is_namedtuple(like) else like[field]
        key = f"{prefix}.{name}" if prefix else name
        if child is None:  # a NamedTuple type: every field must be a tensor
            if sub.get("kind") != "tensor":
                raise ValueError(
                    f"{path}: {key}: holds a nested {sub.get('type')}; pass a template instance to load nested trees"
                )
            values.append(_tensor(tensors, key, path))
        else:
            values.append(_build(sub, child, tensors, key, path))
    return cls(*values) if cls is not dict else dict(zip(names, values))


def load_params(path: str | os.PathLike, like: Any) -> Any:
    """Read a tree saved by ``save_params``.

    like: a flat NamedTuple type (every field a tensor; loaded on CPU), or a template
    instance (NamedTuple or dict, nested allowed) whose types, field names, shapes and
    dtypes the file must match (tensors go to the template's devices).
    Raises ValueError naming the path and the first mismatch, or on an unreadable file.
    """
    path = Path(path)
    if not (_is_namedtuple_type(like) or _is_namedtuple(like) or isinstance(like, dict)):
        raise TypeError(f"like: expected a NamedTuple type or a NamedTuple/dict instance, got {like!r}")
    tensors, structure = _read(path)
    return _build(structure, like, tensors, "", path)
