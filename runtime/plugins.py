"""Import user modules that register their own task families (``env.plugins`` in a config)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable

from runtime.errors import ConfigError


def import_plugins(modules: Iterable[str], source: str = "env.plugins") -> None:
    """Import each module by dotted name; a module registers families when imported.
    ``source`` says where the list came from (a config key, a bundle, ``--plugin``)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(
                f"{source}: cannot import plugin module {name!r} ({exc}); put it on PYTHONPATH "
                "or install it"
            ) from None


def add_plugin_arg(parser: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (repeatable) on a command that needs a task family."""
    parser.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this module first (it registers a task family); repeatable",
    )
