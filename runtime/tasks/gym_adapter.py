"""Plug in your own task family by wrapping a Gymnasium env whose parameters vary.

You provide ``make_env(task) -> gymnasium.Env`` (flat ``Box`` observation and action spaces), the
task splits (an object with ``sample(split, n, rng)``, ``split_of(tasks)``, ``task_low`` and
``task_high``, e.g. :class:`runtime.tasks.splits.BoxSplits`) and, to support mid-episode task
changes, ``set_task(env, task)``. :class:`GymAdapter` is then a factory ``num_envs -> family`` for
:func:`runtime.tasks.register_family`; see ``docs/tasks.md`` for a complete example.

Behaviour
- Bounds come from the env's spaces; the horizon from ``horizon`` or the env's
  ``spec.max_episode_steps`` (it may not exceed the latter).
- Vectorized by looping over N env instances in Python: much slower than the numpy families
  (about 6 x 10^4 env-steps/s for gymnasium's Pendulum-v1 here, against millions for the built-in
  families). Fine for trying a family out and for small runs.
- Each reset seeds every env from the rng passed to ``reset`` (deterministic given a seed). With
  ``set_task`` the N envs are built once and retargeted; without it a task change at reset builds
  a fresh env and ``set_tasks`` mid-episode is an error.
- An env that terminates early stays in its absorbing state until the horizon: its observation
  is repeated, its reward is 0 and ``terminated`` stays True.
- A non-finite observation or reward raises :class:`runtime.errors.NonFiniteError` naming the
  family, the env index, its task and the step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from runtime.errors import EdgeadaptError, NonFiniteError
from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split


class TaskSplits(Protocol):
    """Where tasks come from: disjoint train/test/ood splits with a membership rule."""

    @property
    def task_low(self) -> np.ndarray:
        """Per-dimension lower bound of the train split."""

    @property
    def task_high(self) -> np.ndarray:
        """Per-dimension upper bound of the train split."""

    def sample(self, split: Split, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` task vectors ``(n, task_dim)`` from ``split``."""

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """'train' / 'test' / 'ood' / 'none' for each task vector."""


@dataclass(frozen=True)
class GymAdapter:
    """Describes a user family built from a Gymnasium env; call it with ``num_envs``."""

    #: Registered family name (shown in errors and ``edgeadapt envs``).
    name: str
    #: Builds one env configured for a task vector.
    make_env: Callable[[np.ndarray], Any]
    #: Task splits (see :class:`TaskSplits`).
    splits: TaskSplits
    #: One name per task-vector component, with units.
    task_names: tuple[str, ...]
    #: Reconfigures a live env for a new task (needed for ``set_tasks`` mid-episode).
    set_task: Callable[[Any, np.ndarray], None] | None = None
    #: Episode length in steps; None = the env's ``spec.max_episode_steps``.
    horizon: int | None = None
    description: str = ""
    #: One line per split for `edgeadapt envs`; default: ``splits.notes`` when it exists.
    split_notes: Mapping[str, str] = field(default_factory=dict)

    def __call__(self, num_envs: int) -> GymFamily:
        return GymFamily(self, num_envs)


class GymFamily(TaskFamily):
    """N Gymnasium envs advanced in a Python loop behind the :class:`TaskFamily` protocol."""

    def __init__(self, adapter: GymAdapter, num_envs: int = 1) -> None:
        self.adapter = adapter
        probe_task = (np.asarray(adapter.splits.task_low) + adapter.splits.task_high) / 2.0
        probe = adapter.make_env(probe_task.astype(np.float64))
        self.spec = _spec_from_env(adapter, probe)
        super().__init__(num_envs)
        self.envs: list[Any] = [probe] + [None] * (num_envs - 1)
        self._env_tasks: list[np.ndarray | None] = [probe_task] + [None] * (num_envs - 1)
        self._done = np.zeros(num_envs, dtype=bool)
        self._last_obs = np.zeros((num_envs, self.spec.obs_dim))

    # -- TaskFamily -------------------------------------------------------------------------
    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        tasks = np.asarray(self.adapter.splits.sample(as_split(split), n, rng), dtype=np.float64)
        if tasks.shape != (n, self.spec.task_dim):
            raise EdgeadaptError(
                f"family {self.spec.name!r}: splits.sample returned shape {tasks.shape}, "
                f"expected {(n, self.spec.task_dim)}"
            )
        return tasks

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """The split of each task vector, by the user's membership rule."""
        return np.asarray(self.adapter.splits.split_of(tasks), dtype=object)

    def set_tasks(self, tasks: np.ndarray) -> None:
        if self.adapter.set_task is None:
            raise EdgeadaptError(
                f"family {self.spec.name!r} cannot change tasks mid-episode: give GymAdapter a "
                "set_task(env, task) function"
            )
        super().set_tasks(tasks)
        for env, task in zip(self.envs, self.tasks, strict=True):
            if env is not None:
                self.adapter.set_task(env, task.copy())

    def close(self) -> None:
        """Close every env instance."""
        for env in self.envs:
            if env is not None:
                env.close()

    # -- internals --------------------------------------------------------------------------
    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        seeds = rng.integers(0, 2**31 - 1, size=self.num_envs)
        obs = np.zeros((self.num_envs, self.spec.obs_dim))
        for i in range(self.num_envs):
            env = self._env_for(i, self.tasks[i])
            obs[i] = np.asarray(env.reset(seed=int(seeds[i]))[0], dtype=np.float64).reshape(-1)
        self._check_finite(obs, "observation", "at reset")
        self._done[:] = False
        self._last_obs = obs
        return obs.copy()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        obs = self._last_obs.copy()
        reward = np.zeros(self.num_envs)
        for i in np.flatnonzero(~self._done):
            env = self.envs[i]
            out = env.step(action[i].astype(env.action_space.dtype))
            obs[i] = np.asarray(out[0], dtype=np.float64).reshape(-1)
            reward[i] = float(out[1])
            self._done[i] = bool(out[2])
        when = f"at step {int(self.t[0]) + 1}"
        self._check_finite(obs, "observation", when)
        self._check_finite(reward, "reward", when)
        self._last_obs = obs
        return obs.copy(), reward, self._done.copy()

    def _env_for(self, i: int, task: np.ndarray) -> Any:
        env = self.envs[i]
        if env is None:
            env = self.adapter.make_env(task.copy())
        elif self.adapter.set_task is not None:
            self.adapter.set_task(env, task.copy())
        elif not np.array_equal(self._env_tasks[i], task):
            env.close()
            env = self.adapter.make_env(task.copy())
        self.envs[i], self._env_tasks[i] = env, task.copy()
        return env

    def _check_finite(self, values: np.ndarray, what: str, when: str) -> None:
        bad = ~np.isfinite(values.reshape(self.num_envs, -1)).all(axis=1)
        if not bad.any():
            return
        i = int(np.flatnonzero(bad)[0])
        task = np.array2string(self.tasks[i], precision=4, separator=", ")
        value = np.array2string(values[i], precision=4, separator=", ")
        raise NonFiniteError(
            f"env {self.spec.name!r} ({_env_id(self.envs[i])} instance {i} of {self.num_envs}, "
            f"task {task}) returned a non-finite {what} {when}: {value}"
        )


def _spec_from_env(adapter: GymAdapter, env: Any) -> FamilySpec:
    obs_space, act_space = env.observation_space, env.action_space
    for what, space in (("observation", obs_space), ("action", act_space)):
        if getattr(space, "shape", None) is None or len(space.shape) != 1 or not _is_box(space):
            raise EdgeadaptError(
                f"family {adapter.name!r}: the env's {what} space must be a flat gymnasium Box, "
                f"got {space!r}"
            )
    if not (np.all(np.isfinite(act_space.low)) and np.all(np.isfinite(act_space.high))):
        raise EdgeadaptError(f"family {adapter.name!r}: the action space must be bounded")
    horizon = _horizon(adapter, env)
    low, high = np.asarray(adapter.splits.task_low), np.asarray(adapter.splits.task_high)
    if len(adapter.task_names) != len(low):
        raise EdgeadaptError(
            f"family {adapter.name!r}: {len(adapter.task_names)} task_names for a "
            f"{len(low)}-dimensional task vector"
        )
    return FamilySpec(
        name=adapter.name,
        obs_dim=int(obs_space.shape[0]),
        act_dim=int(act_space.shape[0]),
        task_dim=len(low),
        horizon=horizon,
        obs_low=np.asarray(obs_space.low, dtype=np.float64),
        obs_high=np.asarray(obs_space.high, dtype=np.float64),
        act_low=np.asarray(act_space.low, dtype=np.float64),
        act_high=np.asarray(act_space.high, dtype=np.float64),
        task_low=low.astype(np.float64),
        task_high=high.astype(np.float64),
        task_names=tuple(adapter.task_names),
        dt=None,
        description=adapter.description or f"user family wrapping {_env_id(env)}",
        splits=dict(adapter.split_notes or getattr(adapter.splits, "notes", {})),
    )


def _horizon(adapter: GymAdapter, env: Any) -> int:
    limit = getattr(getattr(env, "spec", None), "max_episode_steps", None)
    horizon = adapter.horizon if adapter.horizon is not None else limit
    if horizon is None or horizon < 1:
        raise EdgeadaptError(
            f"family {adapter.name!r}: the env has no time limit; give GymAdapter a horizon"
        )
    if limit is not None and horizon > limit:
        raise EdgeadaptError(
            f"family {adapter.name!r}: horizon {horizon} exceeds the env's time limit {limit}"
        )
    return int(horizon)


def _is_box(space: Any) -> bool:
    return type(space).__name__ == "Box" and hasattr(space, "low") and hasattr(space, "high")


def _env_id(env: Any) -> str:
    spec = getattr(env, "spec", None)
    return getattr(spec, "id", None) or type(env).__name__
