"""Modules imported on first use: what a short-lived command never touches costs it nothing."""

from __future__ import annotations

import importlib
from typing import Any


class LazyModule:
    """Stands for module `name` and imports it at the first attribute read (the import
    system's lock makes that safe from any thread); then every read is the module's own."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(importlib.import_module(self._name), attribute)

    def __repr__(self) -> str:
        return f"<module {self._name!r}, imported on first use>"


def lazy_import(name: str) -> Any:
    """Module `name`, imported when first used (see LazyModule)."""
    return LazyModule(name)
