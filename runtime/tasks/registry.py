"""Name -> task family registry; users register their own families here."""

from __future__ import annotations

from collections.abc import Callable

from runtime.errors import UnknownNameError
from runtime.tasks.base import TaskFamily

FamilyFactory = Callable[[int], TaskFamily]

_REGISTRY: dict[str, FamilyFactory] = {}
_BUILTINS_LOADED = False


def register_family(name: str, factory: FamilyFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(num_envs) -> TaskFamily`` under ``name``.

    A built-in name (point-nav, drone-wind, ...) counts as taken unless ``overwrite``.
    """
    _ensure_builtins()
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
    """Register the built-in families once (lazily, so importing the registry stays cheap)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    from runtime.tasks.car_friction import CarFriction
    from runtime.tasks.drone_track import DroneTrack
    from runtime.tasks.drone_wind import DroneWind
    from runtime.tasks.nav2d import Nav2D
    from runtime.tasks.point_nav import PointNav, PointNavSparse

    builtins: dict[str, FamilyFactory] = {
        "point-nav": PointNav,
        "point-nav-sparse": PointNavSparse,
        "drone-wind": DroneWind,
        "drone-track": DroneTrack,
        "car-friction": CarFriction,
        "nav2d": Nav2D,
    }
    for name, factory in builtins.items():
        _REGISTRY.setdefault(name, factory)
    _BUILTINS_LOADED = True
