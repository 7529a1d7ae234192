"""Name -> task family registry; users register their own families here."""

from __future__ import annotations

from collections.abc import Callable

from runtime.errors import UnknownNameError
from runtime.tasks.base import TaskFamily

FamilyFactory = Callable[[int], TaskFamily]

_REGISTRY: dict[str, FamilyFactory] = {}


def register_family(name: str, factory: FamilyFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(num_envs) -> TaskFamily`` under ``name``."""
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"task family {name!r} is already registered")
    _REGISTRY[name] = factory


def make_family(name: str, num_envs: int = 1) -> TaskFamily:
    """Build ``num_envs`` environments of the family ``name``."""
    _ensure_builtins()
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown env {name!r}; available: {', '.join(available_families())}"
        ) from None
    return factory(num_envs)


def available_families() -> list[str]:
    """Sorted names of every registered family."""
    _ensure_builtins()
    return sorted(_REGISTRY)


def _ensure_builtins() -> None:
    if "point-nav" in _REGISTRY:
        return
    from runtime.tasks.point_nav import PointNav, PointNavSparse

    register_family("point-nav", PointNav)
    register_family("point-nav-sparse", PointNavSparse)
