"""Import user modules that register their own task families (``env.plugins`` in a config)."""

from __future__ import annotations

import importlib
from collections.abc import Iterable

from runtime.errors import ConfigError


def import_plugins(modules: Iterable[str]) -> None:
    """Import each module by dotted name; a module registers families when imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"env.plugins: cannot import {name!r} ({exc})") from None
