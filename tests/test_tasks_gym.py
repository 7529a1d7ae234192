"""Gymnasium view of the families, and user families wrapped from Gymnasium envs."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from tasks_example import run_example

from runtime.errors import EdgeadaptError, NonFiniteError
from runtime.tasks import make_family
from runtime.tasks.gym_adapter import GymAdapter
from runtime.tasks.gym_view import make_gym_env, register_gym_envs
from runtime.tasks.splits import BoxSplits

BUILTINS = ["point-nav", "point-nav-sparse", "drone-wind", "car-friction"]


# -- the Gymnasium view ----------------------------------------------------------------------
@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.filterwarnings("ignore:.*symmetric and normalized space")  # physical units
def test_gym_view_passes_gymnasium_check_env(name: str) -> None:
    env = make_gym_env(name)
    check_env(env, skip_render_check=True)
    assert env.observation_space.dtype == np.float32
    spec = make_family(name).spec
    np.testing.assert_array_equal(env.action_space.low, spec.act_low.astype(np.float32))


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.filterwarnings("error::UserWarning")
def test_normalized_gym_view_maps_unit_actions_onto_bounds(name: str) -> None:
    physical, unit = make_gym_env(name), make_gym_env(name, normalize_actions=True)
    check_env(unit, skip_render_check=True)
    spec = make_family(name).spec
    physical.reset(seed=5)
    unit.reset(seed=5)
    for a in (-1.0, 1.0, 0.25):
        u = np.full(spec.act_dim, a, dtype=np.float32)
        p = spec.act_low + (spec.act_high - spec.act_low) * (u + 1.0) / 2.0
        np.testing.assert_allclose(unit.step(u)[0], physical.step(p)[0], rtol=1e-6, atol=1e-6)


def test_gym_view_reset_seed_and_task_option() -> None:
    env = make_gym_env("drone-wind", split="test")
    obs1, info1 = env.reset(seed=3)
    obs2, info2 = env.reset(seed=3)
    np.testing.assert_array_equal(obs1, obs2)
    np.testing.assert_array_equal(info1["task"], info2["task"])
    assert make_family("drone-wind").split_of(info1["task"])[0] == "test"
    _, info = env.reset(seed=3, options={"task": [3.0, 0.0, 1.1, 0.0]})
    np.testing.assert_array_equal(info["task"], [3.0, 0.0, 1.1, 0.0])
    _, info = env.reset(seed=3, options={"split": "ood"})
    assert make_family("drone-wind").split_of(info["task"])[0] == "ood"
    with pytest.raises(ValueError, match="task must have 4 numbers"):
        env.reset(options={"task": [1.0, 2.0]})


def test_gym_view_episode_truncates_at_horizon_and_set_task_shifts_wind() -> None:
    calm, shifted = make_gym_env("drone-wind"), make_gym_env("drone-wind")
    hover = np.array([0.0, 9.81], dtype=np.float32)
    for env in (calm, shifted):
        env.reset(seed=0, options={"task": [0.0, 0.0, 1.0, 0.0]})
    shifted.unwrapped.set_task([6.0, 0.0, 1.0, 0.0])
    steps = 0
    while True:
        obs_c, _, _, trunc, _ = calm.step(hover)
        obs_s, _, _, _, info = shifted.step(hover)
        steps += 1
        if trunc:
            break
    assert steps == make_family("drone-wind").spec.horizon
    assert obs_s[0] > obs_c[0]  # pushed downwind (+x)
    np.testing.assert_array_equal(info["task"], [6.0, 0.0, 1.0, 0.0])


def test_register_gym_envs_enables_gym_make() -> None:
    ids = register_gym_envs()
    assert "edgeadapt/car-friction-v0" in ids
    env = gym.make("edgeadapt/car-friction-v0")
    obs, _ = env.reset(seed=1)
    assert obs.shape == (5,)


def test_importing_runtime_tasks_does_not_import_gymnasium() -> None:
    code = (
        "import sys, runtime.tasks, runtime.tasks.gym_view, runtime.tasks.gym_adapter;"
        "from runtime.tasks import make_family; make_family('drone-wind');"
        "assert 'gymnasium' not in sys.modules, 'gymnasium imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_gymnasium_gives_a_one_line_error() -> None:
    code = (
        "import sys; sys.modules['gymnasium'] = None\n"
        "from runtime.tasks.gym_view import make_gym_env\n"
        "try:\n"
        "    make_gym_env('point-nav')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__ + ': ' + str(exc))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = out.stdout.strip()
    assert line.startswith("MissingDependencyError: ") and "\n" not in line
    assert "pip install 'edgeadapt[train]'" in line


# -- GymAdapter --------------------------------------------------------------------------------
def test_docs_example_runs_as_written() -> None:
    ns = run_example()
    result = ns["result"]
    assert result.obs.shape == (8, 3) and result.reward.shape == (8,)
    spec = make_family("pendulum-varied").spec
    assert spec.horizon == 200 and spec.act_low[0] == -2.0 and spec.task_dim == 2


class Drift(gym.Env):
    """A 1-D user env: x' = x + gain * u, reward -|x|; can emit NaN or terminate on purpose."""

    observation_space = gym.spaces.Box(-10.0, 10.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, gain: float, nan_at: int | None = None, end_at: int | None = None):
        self.gain, self.nan_at, self.end_at = gain, nan_at, end_at

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> Any:
        super().reset(seed=seed)
        self.x, self.k = float(self.np_random.uniform(-1, 1)), 0
        return np.array([self.x], np.float32), {}

    def step(self, action: np.ndarray) -> Any:
        self.k += 1
        self.x = float(np.clip(self.x + self.gain * float(action[0]), -10, 10))
        reward = float("nan") if self.k == self.nan_at else -abs(self.x)
        return np.array([self.x], np.float32), reward, self.k == self.end_at, False, {}


def drift_adapter(name: str, set_task: bool = True, **env_kwargs: Any) -> GymAdapter:
    def set_gain(env: Drift, task: np.ndarray) -> None:
        env.gain = float(task[0])

    return GymAdapter(
        name=name,
        make_env=lambda task: Drift(float(task[0]), **env_kwargs),
        set_task=set_gain if set_task else None,
        splits=BoxSplits(low=[0.5], high=[1.0], ood_low=[2.0], ood_high=[3.0], cells=4),
        task_names=("gain",),
        horizon=10,
    )


def test_non_finite_reward_from_user_env_raises_clear_error() -> None:
    envs = drift_adapter("drift-nan", nan_at=3)(4)
    rng = np.random.default_rng(0)
    envs.reset(envs.sample_tasks("train", 4, rng), rng)
    envs.step(np.zeros((4, 1)))
    envs.step(np.zeros((4, 1)))
    with pytest.raises(NonFiniteError) as info:
        envs.step(np.zeros((4, 1)))
    message = str(info.value)
    assert "\n" not in message
    assert "'drift-nan'" in message and "Drift instance 0 of 4" in message
    assert "non-finite reward at step 3" in message


def test_adapter_without_set_task_rebuilds_envs_and_refuses_mid_episode_change() -> None:
    envs = drift_adapter("drift-rebuild", set_task=False)(2)
    rng = np.random.default_rng(0)
    envs.reset(np.array([[0.5], [0.5]]), rng)
    first = envs.envs[0]
    envs.reset(np.array([[0.8], [0.5]]), rng)
    assert envs.envs[0] is not first and envs.envs[0].gain == 0.8
    with pytest.raises(EdgeadaptError, match="set_task"):
        envs.set_tasks(np.array([[0.9], [0.9]]))


def test_terminated_user_env_stays_absorbed_until_horizon() -> None:
    envs = drift_adapter("drift-end", end_at=2)(1)
    rng = np.random.default_rng(0)
    envs.reset(np.array([[1.0]]), rng)
    results = [envs.step(np.ones((1, 1))) for _ in range(envs.spec.horizon)]
    assert [bool(r.terminated[0]) for r in results[:3]] == [False, True, True]
    np.testing.assert_array_equal(results[1].obs, results[-1].obs)
    assert all(r.reward[0] == 0.0 for r in results[2:])
    assert results[-1].truncated[0] and not results[-2].truncated[0]


def test_adapter_horizon_may_not_exceed_the_env_time_limit() -> None:
    adapter = GymAdapter(
        name="pendulum-too-long",
        make_env=lambda task: gym.make("Pendulum-v1"),
        splits=BoxSplits(low=[0.5], high=[1.5], ood_low=[2.0], ood_high=[3.0]),
        task_names=("unused",),
        horizon=500,
    )
    with pytest.raises(EdgeadaptError, match="exceeds the env's time limit 200"):
        adapter(1)


def test_box_splits_reject_an_overlapping_ood_box() -> None:
    with pytest.raises(ValueError, match="overlaps"):
        BoxSplits(low=[0.0, 0.0], high=[1.0, 1.0], ood_low=[0.5, 0.5], ood_high=[2.0, 2.0])
