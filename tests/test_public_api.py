"""The public surface of ``import gcache``: what is exported, documented, typed, cheap and private."""

import dataclasses
import importlib.metadata
import inspect
import re
import subprocess
import sys
import types
import typing

import pytest

import gcache

PUBLIC = list(gcache.__all__)
SHELL = {"LocalModel", "decode_text", "encode_chat", "load_model", "tiny_model"}
RUNNER = {"Inspection", "inspect_run"}  # lazy names of gcache.io.runner.inspection


def test_all_is_unique_public_and_holds_the_shell_names():
    assert len(PUBLIC) == len(set(PUBLIC))
    assert not [n for n in PUBLIC if n.startswith("_")]
    assert SHELL | RUNNER <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_exists_and_comes_from_gcache(name):
    obj = getattr(gcache, name)
    assert getattr(obj, "__module__", "").startswith("gcache."), (name, getattr(obj, "__module__", None))


def _own_doc(name, obj):
    doc = inspect.getdoc(obj) or ""
    # NamedTuple and dataclass synthesize "Name(field, ...)" when the author wrote nothing.
    return "" if doc.startswith(f"{obj.__name__}(") else doc


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_its_own_docstring(name):
    assert _own_doc(name, getattr(gcache, name)).strip(), f"gcache.{name} has no docstring"


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_fully_typed(name):
    obj = getattr(gcache, name)
    if inspect.isclass(obj):
        hints = typing.get_type_hints(obj)
        fields = obj._fields if hasattr(obj, "_fields") else [f.name for f in dataclasses.fields(obj)]
        assert set(fields) <= set(hints), f"gcache.{name}: fields without a type: {set(fields) - set(hints)}"
        return
    assert inspect.isfunction(obj), f"gcache.{name} is neither a class nor a function: {type(obj)}"
    sig = inspect.signature(obj)
    untyped = [p for p, v in sig.parameters.items() if v.annotation is inspect.Parameter.empty]
    assert not untyped, f"gcache.{name}: parameters without a type hint: {untyped}"
    assert sig.return_annotation is not inspect.Signature.empty, f"gcache.{name}: no return type"
    typing.get_type_hints(obj)  # every hint resolves (no stale string annotation)


_RAISE = re.compile(r"^\s*raise (\w+(?:Error|Exception))\b", re.MULTILINE)


@pytest.mark.parametrize("name", [n for n in PUBLIC if inspect.isfunction(getattr(gcache, n))])
def test_docstring_says_what_a_function_raises(name):
    fn = getattr(gcache, name)
    raised = set(_RAISE.findall(inspect.getsource(fn)))
    if raised:
        doc = inspect.getdoc(fn) or ""
        assert re.search(r"\braise", doc, re.IGNORECASE), (
            f"gcache.{name} ({fn.__module__}) raises {sorted(raised)} but its docstring does not say so"
        )


def test_no_private_or_foreign_names_leak():
    allowed = set(PUBLIC) | {"__version__"}
    leaked = [
        n
        for n, v in vars(gcache).items()
        if not n.startswith("_") and n not in allowed and not isinstance(v, types.ModuleType)
    ]
    assert not leaked
    # submodules become attributes when imported; they must be gcache's own
    modules = [n for n, v in vars(gcache).items() if isinstance(v, types.ModuleType) and not n.startswith("_")]
    assert all(getattr(gcache, n).__name__ == f"gcache.{n}" for n in modules), modules
    assert dir(gcache) == sorted(allowed)


def test_unknown_attribute_raises_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        gcache.no_such_name  # noqa: B018
    assert not hasattr(gcache, "torch")


def test_version_matches_the_installed_distribution():
    assert gcache.__version__ == importlib.metadata.version("gcache")


def test_shell_names_resolve_to_the_model_module():
    from gcache.io.models import local as models

    for name in SHELL:
        assert getattr(gcache, name) is getattr(models, name)


def test_runner_names_resolve_to_the_inspection_module():
    from gcache.io.runner import inspection

    for name in RUNNER:
        assert getattr(gcache, name) is getattr(inspection, name)


def test_import_gcache_does_not_import_transformers_or_the_shell():
    code = (
        "import sys, gcache\n"
        "core = [getattr(gcache, n) for n in gcache.__all__ if n not in %r]\n"
        "heavy = [m for m in ('transformers', 'hypothesis', 'gcache.io.models', 'gcache.testing') if m in sys.modules]\n"
        "print(len(core), heavy)\n"
        "sys.exit(1 if heavy else 0)\n"
    ) % (sorted(SHELL | RUNNER),)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == f"{len(PUBLIC) - len(SHELL | RUNNER)} []"
