"""The task-family protocol: vectorized numpy environments whose tasks come from splits.

A *task family* is a distribution over tasks (goal, wind, friction, ...). Each task is a
float vector (its "task vector", what a privileged oracle sees). A family instance is a
batch of ``num_envs`` environments advanced in one numpy call.

Conventions
- Actions passed to :meth:`TaskFamily.step` are in the family's physical action bounds
  (``spec.act_low``..``spec.act_high``) and are clipped to them.
- Observations are float32 arrays of shape ``(num_envs, obs_dim)``.
- Episodes have a fixed horizon; ``truncated`` becomes True at step ``horizon``. ``terminated``
  is reserved for families with absorbing states.
- Everything random comes from the ``np.random.Generator`` passed in (deterministic given a seed).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import NamedTuple

import numpy as np


class Split(str, Enum):
    """Disjoint task splits: meta-train, meta-test (held out, in range) and out-of-distribution."""

    TRAIN = "train"
    TEST = "test"
    OOD = "ood"


@dataclass(frozen=True)
class FamilySpec:
    """Static description of a task family; all bounds are per dimension."""

    name: str
    obs_dim: int
    act_dim: int
    task_dim: int
    horizon: int
    obs_low: np.ndarray
    obs_high: np.ndarray
    act_low: np.ndarray
    act_high: np.ndarray
    #: Range of the task vector over the train split (used to normalize oracle inputs).
    task_low: np.ndarray
    task_high: np.ndarray
    task_names: tuple[str, ...]
    #: Control period in seconds (None when the family has no physical time).
    dt: float | None = None
    description: str = ""
    splits: dict[str, str] = field(default_factory=dict)


class StepResult(NamedTuple):
    """Outcome of one vectorized step; every array has leading dimension ``num_envs``."""

    obs: np.ndarray  # (N, obs_dim) float32
    reward: np.ndarray  # (N,) float32
    terminated: np.ndarray  # (N,) bool
    truncated: np.ndarray  # (N,) bool
    #: (N,) bool for families with a success criterion (Meta-World), else None. An episode
    #: counts as a success when any of its steps is one (Meta-World's convention).
    success: np.ndarray | None = None


class TaskFamily(ABC):
    """A batch of ``num_envs`` environments from one task family.

    Subclasses set :attr:`spec` and implement :meth:`sample_tasks`, :meth:`_reset` and
    :meth:`_step`; the base class handles task bookkeeping, clipping and the time limit.
    """

    spec: FamilySpec

    def __init__(self, num_envs: int = 1) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.num_envs = num_envs
        self.tasks = np.zeros((num_envs, self.spec.task_dim), dtype=np.float64)
        self.t = np.zeros(num_envs, dtype=np.int64)

    # -- public API -------------------------------------------------------------------------
    @abstractmethod
    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        """Return ``n`` task vectors ``(n, task_dim)`` drawn from ``split``."""

    def reset(self, tasks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Start a new episode in every environment under ``tasks`` ``(num_envs, task_dim)``."""
        tasks = np.asarray(tasks, dtype=np.float64)
        if tasks.shape != (self.num_envs, self.spec.task_dim):
            raise ValueError(
                f"{self.spec.name}: tasks must have shape {(self.num_envs, self.spec.task_dim)}, "
                f"got {tasks.shape}"
            )
        self.tasks = tasks.copy()
        self.t[:] = 0
        return self._reset(rng).astype(np.float32)

    def set_tasks(self, tasks: np.ndarray) -> None:
        """Change the task mid-episode (non-stationary conditions: the wind shifts)."""
        tasks = np.asarray(tasks, dtype=np.float64)
        if tasks.shape != self.tasks.shape:
            raise ValueError(f"tasks must have shape {self.tasks.shape}, got {tasks.shape}")
        self.tasks = tasks.copy()

    def step(self, action: np.ndarray) -> StepResult:
        """Advance every environment by one control period with ``action`` ``(N, act_dim)``."""
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (self.num_envs, self.spec.act_dim):
            raise ValueError(
                f"{self.spec.name}: action must have shape {(self.num_envs, self.spec.act_dim)}, "
                f"got {action.shape}"
            )
        action = np.clip(action, self.spec.act_low, self.spec.act_high)
        out = self._step(action)
        obs, reward, terminated = out[:3]
        success = np.asarray(out[3], dtype=bool) if len(out) > 3 else None
        self.t += 1
        truncated = self.t >= self.spec.horizon
        return StepResult(
            obs.astype(np.float32),
            reward.astype(np.float32),
            terminated.astype(bool),
            truncated,
            success,
        )

    # -- for subclasses ---------------------------------------------------------------------
    @abstractmethod
    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        """Reset internal state for ``self.tasks``; return observations ``(N, obs_dim)``."""

    @abstractmethod
    def _step(self, action: np.ndarray) -> tuple[np.ndarray, ...]:
        """Advance the state with clipped ``action``; return ``(obs, reward, terminated)``, or
        ``(obs, reward, terminated, success)`` for a family with a success criterion."""


def as_split(split: Split | str) -> Split:
    """Parse a split name, with a clear error listing the valid ones."""
    try:
        return Split(split)
    except ValueError:
        valid = ", ".join(s.value for s in Split)
        raise ValueError(f"unknown split {split!r}; expected one of: {valid}") from None
