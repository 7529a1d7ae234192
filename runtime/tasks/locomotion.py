"""MuJoCo locomotion meta-RL benchmarks: ``cheetah-vel`` and ``ant-dir`` (the ``bench`` extra).

Both run gymnasium's v5 models (``half_cheetah.xml``, ``ant.xml``) with their observation and
action spaces, reset noise, ``frame_skip`` 5 and dt = 0.05 s, stepped as a batch by
:class:`runtime.tasks.mujoco_batch.MjBatch` instead of one gymnasium env per task.

cheetah-vel (HalfCheetah-v5; MAML, PEARL, VariBAD)
- Observation (17): qpos[1:] (8: root z, root angle, 6 joint angles), qvel (9). Action (6):
  joint torques in [-1, 1].
- Task: target forward velocity v_goal (m/s). Reward -|v - v_goal| - 0.05 ||a||^2 with
  v = (x_after - x_before) / dt, gymnasium's ``info["x_velocity"]``. Horizon 200.
- Range: v_goal in [0, 3] m/s as PEARL (oyster) and VariBAD (MAML and garage use [0, 2]).
  train / test: 10 cells of 0.3 m/s, 2 held out for test (seed 3003); ood: [3.25, 4.0] m/s.

ant-dir (Ant-v5; MAML, PEARL)
- Observation (105): qpos[2:] (13), qvel (14), clipped contact forces cfrc_ext[1:] (78).
  Action (8): joint torques in [-1, 1].
- Task: unit walking direction (d_x, d_y). Reward as Ant-v5 with the forward term along d:
  (xy-velocity of the torso) . d + 1 (alive) - 0.5 ||a||^2 - 5e-4 ||clip(cfrc_ext, -1, 1)||^2.
  The episode terminates (absorbing: reward 0, observation held) when the torso height leaves
  [0.2, 1.0] m, as Ant-v5. Horizon 200.
- MAML and PEARL use two tasks, forward (0 rad) and backward (pi). To hold test tasks out, the
  direction here is forward or backward within +-45 degrees: each 90-degree arc is cut into 6
  cells of 15 degrees, one cell per arc is held out for test (seed 4004); ood: sideways,
  within +-22.5 degrees of +-90 degrees (never trained, a different gait direction).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split
from runtime.tasks.mujoco_batch import MjBatch, Mode, gymnasium_asset
from runtime.tasks.splits import BoxSplits

FRAME_SKIP = 5
RESET_NOISE = 0.1
HORIZON = 200
CHEETAH_CTRL_COST = 0.05
ANT_CTRL_COST = 0.5
ANT_CONTACT_COST = 5e-4
ANT_HEALTHY_Z = (0.2, 1.0)

CHEETAH_SPLITS = BoxSplits(
    low=[0.0], high=[3.0], ood_low=[3.25], ood_high=[4.0], cells=10, test_fraction=0.2, seed=3003
)


def cheetah_reward(v: np.ndarray, v_goal: np.ndarray, action: np.ndarray) -> np.ndarray:
    """-|v - v_goal| - 0.05 ||a||^2 per env (v, v_goal in m/s, a normalized torques)."""
    return -np.abs(v - v_goal) - CHEETAH_CTRL_COST * np.sum(action**2, axis=1)


def ant_reward(
    xy_velocity: np.ndarray,
    direction: np.ndarray,
    action: np.ndarray,
    cfrc_ext: np.ndarray,
    healthy: np.ndarray,
) -> np.ndarray:
    """Ant-v5's reward with the forward term along ``direction`` (m/s along a unit vector):
    forward + 1 (if healthy) - 0.5 ||a||^2 - 5e-4 ||clip(cfrc_ext, -1, 1)||^2."""
    forward = np.sum(xy_velocity * direction, axis=1)
    ctrl = ANT_CTRL_COST * np.sum(action**2, axis=1)
    contact = ANT_CONTACT_COST * np.sum(np.clip(cfrc_ext, -1.0, 1.0) ** 2, axis=(1, 2))
    return forward + healthy.astype(np.float64) - ctrl - contact


class _MujocoFamily(TaskFamily):
    """Shared reset (gymnasium's v5 noise) for a family simulated by :class:`MjBatch`."""

    xml: str
    gym_id: str
    mode: Mode = "rollout"
    contact_forces = False
    #: ``edgeadapt bench envs`` sizes: batch, steps, repeats.
    BENCH_SIZE = (64, 200, 3)

    def __init__(self, num_envs: int = 1, mode: Mode | None = None, threads: int = 1) -> None:
        super().__init__(num_envs)
        self.sim = MjBatch(
            gymnasium_asset(self.xml),
            num_envs,
            FRAME_SKIP,
            mode=mode or self.mode,
            threads=threads,
            contact_forces=self.contact_forces,
        )
        self.dt = float(self.sim.model.opt.timestep) * FRAME_SKIP
        self.bench_path = (
            f"mujoco.rollout over the batch, {threads} thread(s)"
            if self.sim.mode == "rollout"
            else "one Python loop over MjData calling mujoco.mj_step"
        )

    def bench_variants(self, batch: int) -> dict[str, TaskFamily]:
        """The same family run other ways, for ``edgeadapt bench envs``."""
        variants: dict[str, TaskFamily] = {}
        if self.sim.mode == "rollout":
            variants["one Python loop over MjData calling mujoco.mj_step"] = type(self)(
                batch, mode="loop"
            )
        variants[f"a Python loop over gymnasium {self.gym_id} envs (GymAdapter)"] = (
            gymnasium_family(self.spec.name, batch)
        )
        return variants

    def _reset_sim(self, rng: np.random.Generator) -> None:
        """qpos0 + U[-0.1, 0.1], qvel ~ N(0, 0.1^2): HalfCheetah-v5's and Ant-v5's reset."""
        model, n = self.sim.model, self.num_envs
        qpos = self.sim.init_qpos + rng.uniform(-RESET_NOISE, RESET_NOISE, (n, model.nq))
        qvel = self.sim.init_qvel + RESET_NOISE * rng.standard_normal((n, model.nv))
        self.sim.set_state(qpos, qvel)


class CheetahVel(_MujocoFamily):
    """HalfCheetah-v5 running at a target forward velocity."""

    xml = "half_cheetah.xml"
    gym_id = "HalfCheetah-v5"
    spec = FamilySpec(
        name="cheetah-vel",
        obs_dim=17,
        act_dim=6,
        task_dim=1,
        horizon=HORIZON,
        obs_low=np.full(17, -np.inf),
        obs_high=np.full(17, np.inf),
        act_low=np.full(6, -1.0),
        act_high=np.full(6, 1.0),
        task_low=CHEETAH_SPLITS.low,
        task_high=CHEETAH_SPLITS.high,
        task_names=("v_goal_m_s",),
        dt=0.05,
        description="MuJoCo HalfCheetah-v5 at a target velocity, reward -|v - v_goal| - 0.05|a|^2",
        splits={
            "train": "v_goal in [0, 3] m/s (PEARL/VariBAD range): 8 of 10 cells of 0.3 m/s",
            "test": "the 2 held-out cells (seed 3003)",
            "ood": "v_goal uniform in [3.25, 4.0] m/s (faster than any training task)",
        },
    )

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        return CHEETAH_SPLITS.sample(as_split(split), n, rng)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """'train' / 'test' / 'ood' / 'none' per task vector."""
        return CHEETAH_SPLITS.split_of(tasks)

    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        self._reset_sim(rng)
        return self._obs()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        x_before = self.sim.qpos[:, 0].copy()
        self.sim.step(action)
        self.x_velocity = (self.sim.qpos[:, 0] - x_before) / self.dt
        reward = cheetah_reward(self.x_velocity, self.tasks[:, 0], action)
        return self._obs(), reward, np.zeros(self.num_envs, dtype=bool)

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.sim.qpos[:, 1:], self.sim.qvel], axis=1)


@dataclass(frozen=True)
class DirectionSplits:
    """ant-dir's splits over the walking angle theta = atan2(d_y, d_x).

    In range: forward (|theta| <= 45 deg) or backward (|theta - 180 deg| <= 45 deg), each arc cut
    into ``cells`` half-open cells with one per arc held out for test. ood: sideways arcs of
    +-22.5 deg around +-90 deg. Disjoint by construction (the arcs do not overlap).
    """

    cells: int = 6
    seed: int = 4004
    half_width: float = np.pi / 4
    ood_half_width: float = np.pi / 8

    def test_cells(self) -> np.ndarray:
        """Held-out cell index of the forward arc and of the backward arc."""
        return np.random.default_rng(self.seed).integers(0, self.cells, size=2)

    def sample(self, split: Split, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` unit directions ``(n, 2)`` of ``split``."""
        arc = rng.integers(0, 2, size=n)  # 0 forward, 1 backward (or left / right for ood)
        if split is Split.OOD:
            offset = rng.uniform(-self.ood_half_width, self.ood_half_width, size=n)
            theta = np.where(arc == 0, np.pi / 2, -np.pi / 2) + offset
        else:
            held = self.test_cells()[arc]
            if split is Split.TEST:
                cell = held
            else:  # a uniform cell among the other cells - 1 of this arc
                cell = rng.integers(0, self.cells - 1, size=n)
                cell = cell + (cell >= held)
            width = 2 * self.half_width / self.cells
            offset = -self.half_width + (cell + rng.uniform(0.0, 1.0, size=n)) * width
            theta = arc * np.pi + offset
        return np.stack([np.cos(theta), np.sin(theta)], axis=1)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """'train' / 'test' / 'ood' / 'none' per direction (non-unit vectors are 'none')."""
        tasks = np.atleast_2d(np.asarray(tasks, dtype=np.float64))
        theta = np.arctan2(tasks[:, 1], tasks[:, 0])
        unit = np.abs(np.linalg.norm(tasks, axis=1) - 1.0) < 1e-6
        out = np.full(len(tasks), "none", dtype=object)
        for arc, centre in enumerate((0.0, np.pi)):
            offset = _wrap(theta - centre)
            inside = unit & (np.abs(offset) <= self.half_width)
            width = 2 * self.half_width / self.cells
            cell = np.clip(np.floor((offset + self.half_width) / width), 0, self.cells - 1)
            is_test = cell == self.test_cells()[arc]
            out[inside] = np.where(is_test[inside], "test", "train")
        side = np.abs(np.abs(theta) - np.pi / 2) <= self.ood_half_width
        out[unit & side] = "ood"
        return out


ANT_SPLITS = DirectionSplits()


class AntDir(_MujocoFamily):
    """Ant-v5 walking in a direction: forward or backward (+-45 deg), sideways out of range."""

    xml = "ant.xml"
    gym_id = "Ant-v5"
    mode: Mode = "loop"
    contact_forces = True
    spec = FamilySpec(
        name="ant-dir",
        obs_dim=105,
        act_dim=8,
        task_dim=2,
        horizon=HORIZON,
        obs_low=np.full(105, -np.inf),
        obs_high=np.full(105, np.inf),
        act_low=np.full(8, -1.0),
        act_high=np.full(8, 1.0),
        task_low=np.array([-1.0, -np.sin(np.pi / 4)]),
        task_high=np.array([1.0, np.sin(np.pi / 4)]),
        task_names=("dir_x", "dir_y"),
        dt=0.05,
        description="MuJoCo Ant-v5 walking in a direction (forward/backward +-45 deg)",
        splits={
            "train": "forward or backward within +-45 deg: 5 of 6 cells of 15 deg per arc",
            "test": "one held-out 15-deg cell per arc (seed 4004)",
            "ood": "sideways: within +-22.5 deg of +-90 deg",
        },
    )

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        return ANT_SPLITS.sample(as_split(split), n, rng)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        """'train' / 'test' / 'ood' / 'none' per task vector."""
        return ANT_SPLITS.split_of(tasks)

    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        self._reset_sim(rng)
        self._done = np.zeros(self.num_envs, dtype=bool)
        self._xy = self.sim.body_xpos(1)[:, :2].copy()
        self._last_obs = self._obs()
        return self._last_obs.copy()

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.sim.step(action, active=~self._done)
        xy = self.sim.body_xpos(1)[:, :2].copy()
        self.xy_velocity = (xy - self._xy) / self.dt
        self._xy = xy
        state = np.concatenate([self.sim.qpos, self.sim.qvel], axis=1)
        z_low, z_high = ANT_HEALTHY_Z
        healthy = np.isfinite(state).all(axis=1) & (state[:, 2] >= z_low) & (state[:, 2] <= z_high)
        reward = ant_reward(self.xy_velocity, self.tasks, action, self.sim.cfrc_ext, healthy)
        live = ~self._done
        obs = np.where(live[:, None], self._obs(), self._last_obs)
        reward = np.where(live, reward, 0.0)
        self._done = self._done | ~healthy
        self._last_obs = obs
        return obs.copy(), reward, self._done.copy()

    def _obs(self) -> np.ndarray:
        forces = np.clip(self.sim.cfrc_ext[:, 1:], -1.0, 1.0).reshape(self.num_envs, -1)
        return np.concatenate([self.sim.qpos[:, 2:], self.sim.qvel, forces], axis=1)


def gymnasium_family(name: str, num_envs: int) -> TaskFamily:
    """``cheetah-vel`` or ``ant-dir`` as N gymnasium envs in a Python loop (:class:`GymAdapter`):
    the reference for speed and for equality of observations and rewards."""
    import gymnasium as gym

    from runtime.tasks.gym_adapter import GymAdapter

    cheetah = name == "cheetah-vel"
    family = CheetahVel if cheetah else AntDir

    def set_task(env: gym.Env, task: np.ndarray) -> None:
        env.unwrapped.meta_task = np.asarray(task, dtype=np.float64)

    def make_env(task: np.ndarray) -> gym.Env:
        env = _task_reward(gym.make(family.gym_id, max_episode_steps=HORIZON), cheetah)
        set_task(env, task)
        return env

    adapter = GymAdapter(
        name=f"{name}-gymnasium",
        make_env=make_env,
        splits=CHEETAH_SPLITS if cheetah else _GymDirectionSplits(),
        task_names=family.spec.task_names,
        set_task=set_task,
        horizon=HORIZON,
    )
    return adapter(num_envs)


def _reward_wrapper():
    import gymnasium as gym

    class TaskReward(gym.Wrapper):
        """Replaces the v5 reward by cheetah-vel's or ant-dir's, from gymnasium's own info."""

        def __init__(self, env: gym.Env, cheetah: bool) -> None:
            super().__init__(env)
            self.cheetah = cheetah

        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            task = self.env.unwrapped.meta_task
            a = np.asarray(action, dtype=np.float64)[None]
            if self.cheetah:
                reward = cheetah_reward(np.array([info["x_velocity"]]), task[:1], a)[0]
            else:
                forward = info["x_velocity"] * task[0] + info["y_velocity"] * task[1]
                reward = reward - info["reward_forward"] + forward
            return obs, float(reward), terminated, truncated, info

    return TaskReward


def _task_reward(env, cheetah: bool):
    """``env`` with the family's reward (the wrapper class is built lazily: gymnasium)."""
    return _reward_wrapper()(env, cheetah)


class _GymDirectionSplits:
    """:data:`ANT_SPLITS` with the ``task_low``/``task_high`` a GymAdapter asks for."""

    task_low = AntDir.spec.task_low
    task_high = AntDir.spec.task_high

    def sample(self, split: Split, n: int, rng: np.random.Generator) -> np.ndarray:
        return ANT_SPLITS.sample(split, n, rng)

    def split_of(self, tasks: np.ndarray) -> np.ndarray:
        return ANT_SPLITS.split_of(tasks)


def _wrap(angle: np.ndarray) -> np.ndarray:
    """Angle in (-pi, pi]."""
    return np.pi - np.mod(np.pi - angle, 2 * np.pi)
