"""Name -> task family registry; users register their own families here."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable

from runtime.errors import MissingExtraError, UnknownNameError
from runtime.tasks.base import TaskFamily

FamilyFactory = Callable[[int], TaskFamily]

_REGISTRY: dict[str, FamilyFactory] = {}
_BUILTINS_LOADED = False

#: Families of the ``bench`` extra: name -> (module:class, modules it needs). They are listed
#: only when those modules are installed, and their modules are imported only when one is
#: built, so importing the registry never imports mujoco or metaworld.
OPTIONAL_FAMILIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "cheetah-vel": ("runtime.tasks.locomotion:CheetahVel", ("mujoco", "gymnasium")),
    "ant-dir": ("runtime.tasks.locomotion:AntDir", ("mujoco", "gymnasium")),
    "ml1-reach": ("runtime.tasks.metaworld_ml1:ML1Reach", ("mujoco", "gymnasium", "metaworld")),
    "ml1-push": ("runtime.tasks.metaworld_ml1:ML1Push", ("mujoco", "gymnasium", "metaworld")),
}
BENCH_INSTALL = "pip install 'edgeadapt[bench]'"


def register_family(name: str, factory: FamilyFactory, *, overwrite: bool = False) -> None:
    """Register ``factory(num_envs) -> TaskFamily`` under ``name``.

    A built-in name (point-nav, drone-wind, cheetah-vel, ...) counts as taken unless
    ``overwrite``.
    """
    _ensure_builtins()
    if (name in _REGISTRY or name in OPTIONAL_FAMILIES) and not overwrite:
        raise ValueError(f"task family {name!r} is already registered")
    _REGISTRY[name] = factory


def make_family(name: str, num_envs: int = 1) -> TaskFamily:
    """Build ``num_envs`` environments of the family ``name``."""
    _ensure_builtins()
    if name not in _REGISTRY and name in OPTIONAL_FAMILIES:
        return _optional_factory(name)(num_envs)
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown env {name!r}; available: {', '.join(available_families())}"
        ) from None
    return factory(num_envs)


def available_families() -> list[str]:
    """Sorted names of every registered family (``bench`` families only when installed)."""
    _ensure_builtins()
    optional = {name for name in OPTIONAL_FAMILIES if not missing_modules(name)}
    return sorted(set(_REGISTRY) | optional)


def missing_modules(name: str) -> list[str]:
    """Modules an optional family needs that are not installed (found without importing)."""
    return [m for m in OPTIONAL_FAMILIES[name][1] if not _installed(m)]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a blocked import (sys.modules[name] = None)
        return False


def _optional_factory(name: str) -> FamilyFactory:
    """Import an optional family's module, or fail in one line naming the extra."""
    missing = missing_modules(name)
    if missing:
        raise MissingExtraError(
            f"task family {name!r} needs the bench extra (module {missing[0]!r} is missing): "
            f"{BENCH_INSTALL}"
        )
    module, attr = OPTIONAL_FAMILIES[name][0].split(":")
    return getattr(importlib.import_module(module), attr)


def _ensure_builtins() -> None:
    """Register the built-in families once (lazily, so importing the registry stays cheap)."""
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    from runtime.tasks.car_friction import CarFriction
    from runtime.tasks.drone_track import DroneTrack, DroneTrackResidual
    from runtime.tasks.drone_wind import DroneWind
    from runtime.tasks.nav2d import Nav2D
    from runtime.tasks.point_nav import PointNav, PointNavSparse

    builtins: dict[str, FamilyFactory] = {
        "point-nav": PointNav,
        "point-nav-sparse": PointNavSparse,
        "drone-wind": DroneWind,
        "drone-track": DroneTrack,
        "drone-track-residual": DroneTrackResidual,
        "car-friction": CarFriction,
        "nav2d": Nav2D,
    }
    for name, factory in builtins.items():
        _REGISTRY.setdefault(name, factory)
    _BUILTINS_LOADED = True
