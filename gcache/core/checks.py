"""Argument checks shared by the core and the shell."""

from __future__ import annotations

from typing import Any


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` when it is an integer >= ``minimum`` (a bool is not one here); else a
    ValueError naming ``name`` and what was expected."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return value


__all__ = ["check_int"]
