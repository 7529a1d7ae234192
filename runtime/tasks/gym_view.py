"""A Gymnasium-compatible single-environment view of any task family.

``gymnasium`` is not a core (device-side) dependency: it ships with the ``train`` extra. This
module imports it only when a view is built, so ``import runtime.tasks`` never needs it.

Example::

    from runtime.tasks.gym_view import make_gym_env

    env = make_gym_env("drone-wind", split="test")
    obs, info = env.reset(seed=0)                          # task sampled from the test split
    obs, info = env.reset(seed=0, options={"task": [3.0, 0.0, 1.1, 0.0]})   # or given
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample())
    env.unwrapped.set_task([-3.0, 0.0, 1.1, 0.0])          # the wind shifts mid-episode

Spaces: ``observation_space`` and ``action_space`` are float32 ``Box`` es with the family's
declared bounds; actions are physical (N, rad, m/s^2, ...) and clipped to the box like the family,
or in [-1, 1] per axis with ``make_gym_env(..., normalize_actions=True)``.
``info["task"]`` always holds the current task vector. ``register_gym_envs()`` registers every
family as ``edgeadapt/<name>-v0`` for ``gymnasium.make``.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from runtime.errors import EdgeadaptError
from runtime.tasks.base import Split, TaskFamily, as_split
from runtime.tasks.registry import available_families, make_family

GYM_NAMESPACE = "edgeadapt"


class MissingDependencyError(EdgeadaptError):
    """An optional package needed for this feature is not installed."""


def make_gym_env(
    family: str | TaskFamily, split: Split | str = Split.TRAIN, normalize_actions: bool = False
) -> Any:
    """A ``gymnasium.Env`` over one environment of ``family`` (a name or a 1-env family).

    Without ``options={"task": ...}``, :meth:`reset` samples the task from ``split`` with the
    env's seeded ``np_random``. With ``normalize_actions`` the action space is [-1, 1] per axis,
    mapped linearly onto the family's physical bounds (what most RL libraries expect).
    """
    return gym_view_class()(family, split, normalize_actions)


def register_gym_envs() -> list[str]:
    """Register every family with gymnasium as ``edgeadapt/<name>-v0``; return the ids."""
    gym = import_gymnasium()
    ids = []
    for name in available_families():
        env_id = f"{GYM_NAMESPACE}/{name}-v0"
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=functools.partial(make_gym_env, name))
        ids.append(env_id)
    return ids


def import_gymnasium() -> Any:
    """Import gymnasium or fail with a one-line hint on how to install it."""
    try:
        import gymnasium
    except ImportError:
        raise MissingDependencyError(
            "the Gymnasium view needs the 'gymnasium' package: pip install 'edgeadapt[train]'"
        ) from None
    return gymnasium


@functools.cache
def gym_view_class() -> type:
    """Build the view class (a ``gymnasium.Env`` subclass) on first use."""
    gym = import_gymnasium()

    class GymView(gym.Env):
        """One environment of a task family behind the Gymnasium API."""

        metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012 (gymnasium convention)

        def __init__(
            self,
            family: str | TaskFamily,
            split: Split | str = Split.TRAIN,
            normalize_actions: bool = False,
        ) -> None:
            self.family = make_family(family, 1) if isinstance(family, str) else family
            if self.family.num_envs != 1:
                n = self.family.num_envs
                raise ValueError(f"a Gymnasium view needs a 1-env family, got {n} envs")
            self.split = as_split(split)
            spec = self.family.spec
            self.family_spec = spec
            self.observation_space = _box(gym, spec.obs_low, spec.obs_high)
            self.normalize_actions = normalize_actions
            if normalize_actions:
                ones = np.ones(spec.act_dim)
                self.action_space = _box(gym, -ones, ones)
            else:
                self.action_space = _box(gym, spec.act_low, spec.act_high)

        def reset(
            self, *, seed: int | None = None, options: dict[str, Any] | None = None
        ) -> tuple[np.ndarray, dict[str, Any]]:
            super().reset(seed=seed)
            options = options or {}
            task = options.get("task")
            if task is None:
                split = as_split(options.get("split", self.split))
                task = self.family.sample_tasks(split, 1, self.np_random)[0]
            task = self._task_row(task)
            obs = self.family.reset(task[None, :], self.np_random)
            return obs[0], self._info()

        def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
            action = np.asarray(action, dtype=np.float64).reshape(1, -1)
            if self.normalize_actions:
                spec = self.family_spec
                half = (spec.act_high - spec.act_low) / 2.0
                action = spec.act_low + half * (np.clip(action, -1.0, 1.0) + 1.0)
            res = self.family.step(action)
            return (
                res.obs[0],
                float(res.reward[0]),
                bool(res.terminated[0]),
                bool(res.truncated[0]),
                self._info(),
            )

        def set_task(self, task: np.ndarray) -> None:
            """Change the task mid-episode (e.g. the wind shifts)."""
            self.family.set_tasks(self._task_row(task)[None, :])

        def _task_row(self, task: Any) -> np.ndarray:
            row = np.asarray(task, dtype=np.float64).reshape(-1)
            if row.shape != (self.family_spec.task_dim,):
                raise ValueError(
                    f"{self.family_spec.name}: task must have {self.family_spec.task_dim} "
                    f"numbers {self.family_spec.task_names}, got {row.shape}"
                )
            return row

        def _info(self) -> dict[str, Any]:
            return {"task": self.family.tasks[0].copy()}

    return GymView


def _box(gym: Any, low: np.ndarray, high: np.ndarray) -> Any:
    return gym.spaces.Box(
        np.asarray(low, dtype=np.float32), np.asarray(high, dtype=np.float32), dtype=np.float32
    )
