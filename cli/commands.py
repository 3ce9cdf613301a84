"""Imports every sub-command module so that each registers itself on the app."""

import importlib
import pkgutil

import gcache_cli

for _info in pkgutil.iter_modules(gcache_cli.__path__):
    if _info.name.startswith("cmd_"):
        importlib.import_module(f"gcache_cli.{_info.name}")
