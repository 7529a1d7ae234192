"""Task families (numpy only): point-nav(-sparse), drone-wind, drone-track, car-friction, nav2d."""

from __future__ import annotations

from runtime.tasks.base import FamilySpec, Split, StepResult, TaskFamily
from runtime.tasks.registry import available_families, make_family, register_family

__all__ = [
    "FamilySpec",
    "Split",
    "StepResult",
    "TaskFamily",
    "available_families",
    "make_family",
    "register_family",
]
