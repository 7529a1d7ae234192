"""``nav2d``: the 2-D navigation family of MAML (Finn et al., 2017), with disjoint splits.

- State: position p in m, start (0, 0). Observation = position.
- Action: a velocity step in m per step, clipped to [-0.1, 0.1] per axis; p' = p + a.
- Task: goal g. Task vector = (g_x, g_y).
- Reward: -||p' - g|| (m). Horizon 100 steps, never terminates early.
- Splits (MAML draws goals uniform in [-0.5, 0.5]^2; here that box is cut so that test goals are
  never trained on):

  - train / test: the box is cut into 5 x 5 cells of 0.2 m; 5 cells (20 %, fixed seed) are held
    out for test, the other 20 are train (see :mod:`runtime.tasks.splits`).
  - ood: goals in the annulus 0.8 m <= ||g|| <= 1.0 m (uniform angle and radius). Every such goal
    has a coordinate of magnitude >= 0.8 / sqrt(2) > 0.5, so it lies outside the training box.

Privileged oracle (:func:`oracle_action`): step each axis straight toward the goal at the per-axis
speed limit, ``clip(g - p, -0.1, 0.1)``. That minimizes every axis' distance at every step at
once, so it minimizes the distance at every step: the best possible return of each task.
"""

from __future__ import annotations

import numpy as np

from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split
from runtime.tasks.splits import HeldOutCells

HORIZON = 100
MAX_STEP = 0.1  # m per step and axis
GOAL_RANGE = 0.5  # m: train/test goals in [-0.5, 0.5]^2
OOD_RADIUS = (0.8, 1.0)  # m
_CELLS = HeldOutCells(
    np.full(2, -GOAL_RANGE), np.full(2, GOAL_RANGE), cells=5, test_fraction=0.2, seed=2017
)
# 100 steps of at most 0.1 m per axis from the origin: |p| <= 10 m per axis.
_OBS_HIGH = np.full(2, MAX_STEP * HORIZON + 0.5)

SPEC = FamilySpec(
    name="nav2d",
    obs_dim=2,
    act_dim=2,
    task_dim=2,
    horizon=HORIZON,
    obs_low=-_OBS_HIGH,
    obs_high=_OBS_HIGH,
    act_low=np.full(2, -MAX_STEP),
    act_high=np.full(2, MAX_STEP),
    task_low=np.full(2, -GOAL_RANGE),
    task_high=np.full(2, GOAL_RANGE),
    task_names=("goal_x", "goal_y"),
    dt=None,
    description="MAML 2-D navigation: velocity steps toward an unknown goal, reward -distance",
    splits={
        "train": "20 of 25 cells (0.2 m) of the goal box [-0.5, 0.5]^2",
        "test": "the 5 held-out cells (seed 2017)",
        "ood": "goals in the annulus 0.8 m <= |g| <= 1.0 m (outside the box)",
    },
)


class Nav2D(TaskFamily):
    """MAML's 2-D point navigation with dense reward ``-||p - g||``."""

    spec = SPEC

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        split = as_split(split)
        if split is Split.OOD:
            angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
            radius = rng.uniform(*OOD_RADIUS, size=n)
            return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)
        return _CELLS.sample(split, n, rng)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """Membership of each goal: 'train', 'test', 'ood' or 'none'."""
        tasks = np.atleast_2d(np.asarray(tasks, dtype=np.float64))
        out = np.full(len(tasks), "none", dtype=object)
        inside = _CELLS.in_box(tasks)
        out[inside] = np.where(_CELLS.is_test(tasks[inside]), "test", "train")
        radius = np.linalg.norm(tasks, axis=1)
        out[(radius >= OOD_RADIUS[0]) & (radius <= OOD_RADIUS[1])] = "ood"
        return out

    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        self.pos = np.zeros((self.num_envs, 2))
        return self.pos.copy()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.pos = self.pos + action
        reward = -np.linalg.norm(self.pos - self.tasks, axis=1)
        return self.pos.copy(), reward, np.zeros(self.num_envs, dtype=bool)


def oracle_action(obs: np.ndarray, tasks: np.ndarray) -> np.ndarray:
    """Physical action of the privileged oracle: each axis straight to the goal at full speed."""
    return np.clip(np.asarray(tasks) - np.asarray(obs), -MAX_STEP, MAX_STEP)
