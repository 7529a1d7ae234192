"""PEARL's 2-D point robot (Rakelly et al., 2019), dense and sparse reward variants.

- State: position p in metres, start (0, 0). Observation = position.
- Action: a in [-1, 1]^2 (per axis); the robot moves by 0.1 * a per step (m).
- Task: goal g on the unit circle at angle theta. Task vector = (g_x, g_y).
- Reward (dense): -||p - g||. Sparse: 1 - d when d <= 0.2 (the goal radius), else 0.
- Horizon: 20 steps.
- Splits: 100 angles linspace(0, pi, 100) on the upper half circle, a fixed seeded permutation
  gives 80 train / 20 test angles. ood: 100 angles on the *lower* half circle (exclusive of the
  end points, so no ood goal equals a train goal).
"""

from __future__ import annotations

import numpy as np

from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split

_N_ANGLES = 100
_N_TRAIN = 80
_SPLIT_SEED = 1337  # fixed: the split is part of the benchmark definition
_STEP = 0.1
_SPARSE_RADIUS = 0.2


def _angles(split: Split) -> np.ndarray:
    if split is Split.OOD:
        return np.linspace(np.pi, 2 * np.pi, _N_ANGLES + 2)[1:-1]
    upper = np.linspace(0.0, np.pi, _N_ANGLES)
    order = np.random.default_rng(_SPLIT_SEED).permutation(_N_ANGLES)
    idx = order[:_N_TRAIN] if split is Split.TRAIN else order[_N_TRAIN:]
    return upper[np.sort(idx)]


def _spec(name: str, sparse: bool) -> FamilySpec:
    kind = "sparse (1 - d within 0.2 m)" if sparse else "dense (-distance)"
    return FamilySpec(
        name=name,
        obs_dim=2,
        act_dim=2,
        task_dim=2,
        horizon=20,
        obs_low=np.full(2, -3.0),
        obs_high=np.full(2, 3.0),
        act_low=np.full(2, -1.0),
        act_high=np.full(2, 1.0),
        task_low=np.array([-1.0, 0.0]),
        task_high=np.array([1.0, 1.0]),
        task_names=("goal_x", "goal_y"),
        dt=None,
        description=f"PEARL point robot, goal on the unit half circle, {kind} reward",
        splits={
            "train": "80 of 100 angles in [0, pi] (fixed seeded permutation)",
            "test": "the other 20 angles in [0, pi]",
            "ood": "100 angles in (pi, 2 pi): goals on the lower half circle",
        },
    )


class PointNav(TaskFamily):
    """Point robot with dense reward ``-||p - g||``."""

    spec = _spec("point-nav", sparse=False)
    sparse = False

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        angles = _angles(as_split(split))
        theta = angles[rng.integers(0, len(angles), size=n)]
        return np.stack([np.cos(theta), np.sin(theta)], axis=1)

    def task_pool(self, split: Split | str) -> np.ndarray:
        """Every task of a split, in a fixed order (for exhaustive evaluation)."""
        theta = _angles(as_split(split))
        return np.stack([np.cos(theta), np.sin(theta)], axis=1)

    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        self.pos = np.zeros((self.num_envs, 2))
        return self.pos.copy()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.pos = self.pos + _STEP * action
        dist = np.linalg.norm(self.pos - self.tasks, axis=1)
        reward = np.where(dist <= _SPARSE_RADIUS, 1.0 - dist, 0.0) if self.sparse else -dist
        return self.pos.copy(), reward, np.zeros(self.num_envs, dtype=bool)


class PointNavSparse(PointNav):
    """Point robot with sparse reward ``1 - d`` inside 0.2 m of the goal, else 0."""

    spec = _spec("point-nav-sparse", sparse=True)
    sparse = True
