"""Meta-World ML1 (``ml1-reach``, ``ml1-push``) as task families (the ``bench`` extra).

Meta-World 3.x on gymnasium 1.x. A task is Meta-World's ``rand_vec``: the object's initial
position (3, m) and the goal position (3, m), so the task vector is 6-dimensional.

- Observation (39): hand xyz, gripper opening, object pose (14), the same 18 values at the
  previous step, and the goal (3), which ML1 hides (zeros: ``partially_observable``). Bounds as
  Meta-World's space, except the hidden goal's degenerate [0, 0] bounds, widened to (-inf, inf).
  Action (4): hand displacement xyz and gripper effort, each in [-1, 1].
- Reward: Meta-World's v2 reward (0..10 per step). ``success`` per step (reach: hand within
  5 cm of the goal; push: puck within 5 cm); an episode succeeds when any of its steps does.
- Horizon: 500 steps, Meta-World's ``max_path_length`` and the benchmark definition. A family
  built with ``horizon=H`` (H <= 500) ends episodes earlier, for cheaper training; its success
  rates are then not comparable to published ML1 numbers.
- Splits: train = the 50 tasks of ``gym.make_vec('Meta-World/ML1-train', env_name=...,
  seed=0)`` (``metaworld.ML1(env_name, seed=0).train_tasks``), test = the 50 of
  ``ML1-test`` (its ``test_tasks``, drawn with seed 1), both finite pools (``task_pool``);
  ood = goals beyond the goal box in x by 0.05-0.15 m (either side), object in its box.
- Reset is deterministic given the task (Meta-World adds no reset noise in ML1).

Each environment is Meta-World's env class for ``env_name`` configured with ``set_task``: the
family gives every env an explicit task vector, while ``make_vec`` chooses tasks itself and
needs the batch size to divide 50. The batch is a Python loop over those envs (about 3k
env-steps/s here: Meta-World's reward code is Python per env).
"""

from __future__ import annotations

import functools
import pickle

import numpy as np

from runtime.errors import EdgeadaptError
from runtime.tasks.base import FamilySpec, Split, TaskFamily, as_split

BENCHMARK_SEED = 0
MAX_PATH_LENGTH = 500
OOD_GOAL_MARGIN = (0.05, 0.15)  # m beyond the goal box in x
MIN_OBJ_GOAL_XY = 0.15  # Meta-World re-draws tasks whose object and goal are closer (m)


class ML1Family(TaskFamily):
    """Meta-World ML1 for one environment (``env_name``); see the module docstring."""

    env_name: str
    name: str
    #: ``edgeadapt bench envs`` sizes: batch, steps, repeats.
    BENCH_SIZE = (10, 100, 3)
    bench_path = "a Python loop over Meta-World envs (env.step: MuJoCo + Python reward)"

    def __init__(self, num_envs: int = 1, horizon: int = MAX_PATH_LENGTH) -> None:
        if not 1 <= horizon <= MAX_PATH_LENGTH:
            raise EdgeadaptError(f"{self.name}: horizon must be in 1..500, got {horizon}")
        self.spec = _spec(self.env_name, self.name, horizon)
        super().__init__(num_envs)
        self.envs = [_make_env(self.env_name) for _ in range(num_envs)]
        self._cls = type(self.envs[0])

    def task_pool(self, split: Split | str) -> np.ndarray:
        """Every task of a split, in a fixed order (50 train, 50 test, 200 ood)."""
        return _pools(self.env_name)[as_split(split)]

    def sample_tasks(self, split: Split | str, n: int, rng: np.random.Generator) -> np.ndarray:
        pool = self.task_pool(split)
        return pool[rng.integers(0, len(pool), size=n)]

    def set_tasks(self, tasks: np.ndarray) -> None:
        """Move each goal now (the object stays where it is until the next reset)."""
        super().set_tasks(tasks)
        for env, task in zip(self.envs, self.tasks, strict=True):
            env.set_task(self._task(task))
            env._target_pos = self._goal_of(env, task)
            env.model.site("goal").pos = env._target_pos

    def close(self) -> None:
        """Close every env."""
        for env in self.envs:
            env.close()

    # -- internals --------------------------------------------------------------------------
    def _reset(self, rng: np.random.Generator) -> np.ndarray:
        obs = np.zeros((self.num_envs, self.spec.obs_dim))
        for i, env in enumerate(self.envs):
            env.set_task(self._task(self.tasks[i]))
            obs[i] = env.reset()[0]
        return obs

    def _step(self, action: np.ndarray) -> tuple[np.ndarray, ...]:
        obs = np.zeros((self.num_envs, self.spec.obs_dim))
        reward = np.zeros(self.num_envs)
        success = np.zeros(self.num_envs, dtype=bool)
        for i, env in enumerate(self.envs):
            o, r, _, _, info = env.step(action[i].astype(np.float32))
            obs[i], reward[i], success[i] = o, r, bool(info["success"])
        return obs, reward, np.zeros(self.num_envs, dtype=bool), success

    def _task(self, task: np.ndarray):
        import metaworld

        data = {"env_cls": self._cls, "rand_vec": task.copy(), "partially_observable": True}
        return metaworld.Task(env_name=self.env_name, data=pickle.dumps(data))

    @staticmethod
    def _goal_of(env, task: np.ndarray) -> np.ndarray:
        return task[3:].copy()


class ML1Reach(ML1Family):
    """ML1 reach-v3: move the hand to a goal position (the goal is hidden)."""

    env_name = "reach-v3"
    name = "ml1-reach"


class ML1Push(ML1Family):
    """ML1 push-v3: push a puck to a goal position on the table (the goal is hidden)."""

    env_name = "push-v3"
    name = "ml1-push"

    @staticmethod
    def _goal_of(env, task: np.ndarray) -> np.ndarray:
        return np.array([task[3], task[4], env.obj_init_pos[-1]])


def _make_env(env_name: str):
    """One Meta-World env for ML1 (v2 reward, 500-step limit, goal hidden once a task is set)."""
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    env = ALL_V3_ENVIRONMENTS[env_name]()
    env.seed(BENCHMARK_SEED)
    return env


@functools.cache
def _pools(env_name: str) -> dict[Split, np.ndarray]:
    """The fixed train / test / ood task pools of ``env_name``."""
    import metaworld

    bench = metaworld.ML1(env_name, seed=BENCHMARK_SEED)
    train = np.array([pickle.loads(t.data)["rand_vec"] for t in bench.train_tasks])
    test = np.array([pickle.loads(t.data)["rand_vec"] for t in bench.test_tasks])
    env = _make_env(env_name)
    space = env._random_reset_space
    return {Split.TRAIN: train, Split.TEST: test, Split.OOD: _ood_pool(space.low, space.high)}


def _ood_pool(low: np.ndarray, high: np.ndarray, n: int = 200) -> np.ndarray:
    """Goals 0.05-0.15 m beyond the goal box in x (either side); object in its box."""
    rng = np.random.default_rng(BENCHMARK_SEED + 2)
    out: list[np.ndarray] = []
    while len(out) < n:
        task = rng.uniform(low, high)
        side = rng.choice([-1.0, 1.0])
        beyond = rng.uniform(*OOD_GOAL_MARGIN)
        task[3] = high[3] + beyond if side > 0 else low[3] - beyond
        if np.linalg.norm(task[:2] - task[3:5]) >= MIN_OBJ_GOAL_XY:
            out.append(task)
    return np.array(out)


@functools.cache
def _spec(env_name: str, name: str, horizon: int) -> FamilySpec:
    env = _make_env(env_name)
    env.set_task(_any_task(env_name, type(env)))
    obs_space, act_space = env.observation_space, env.action_space
    low, high = np.asarray(obs_space.low, np.float64), np.asarray(obs_space.high, np.float64)
    degenerate = low >= high
    low, high = np.where(degenerate, -np.inf, low), np.where(degenerate, np.inf, high)
    space = env._random_reset_space
    env.close()
    return FamilySpec(
        name=name,
        obs_dim=int(obs_space.shape[0]),
        act_dim=int(act_space.shape[0]),
        task_dim=int(space.low.shape[0]),
        horizon=horizon,
        obs_low=low,
        obs_high=high,
        act_low=np.asarray(act_space.low, np.float64),
        act_high=np.asarray(act_space.high, np.float64),
        task_low=np.asarray(space.low, np.float64),
        task_high=np.asarray(space.high, np.float64),
        task_names=("obj_x", "obj_y", "obj_z", "goal_x", "goal_y", "goal_z"),
        dt=float(env.dt),
        description=f"Meta-World ML1 {env_name} (goal hidden), success rate as the metric",
        splits={
            "train": "the 50 ML1-train tasks (metaworld.ML1 seed 0)",
            "test": "the 50 ML1-test tasks (held out, same distribution)",
            "ood": "200 goals 0.05-0.15 m beyond the goal box in x",
        },
    )


def _any_task(env_name: str, cls: type):
    import metaworld

    rand_vec = _pools(env_name)[Split.TRAIN][0]
    data = {"env_cls": cls, "rand_vec": rand_vec, "partially_observable": True}
    return metaworld.Task(env_name=env_name, data=pickle.dumps(data))
