"""The bench extra's families: cheetah-vel, ant-dir (MuJoCo) and Meta-World ML1.

Real MuJoCo and Meta-World; skipped with the reason when the extra is not installed (make
install installs it, so CI runs them). The family contract itself is in test_tasks_contract.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.tasks.registry import OPTIONAL_FAMILIES, missing_modules

MISSING = sorted({m for name in OPTIONAL_FAMILIES for m in missing_modules(name)})
needs_bench = pytest.mark.skipif(
    bool(MISSING),
    reason=f"the bench extra is not installed (missing {MISSING}): pip install 'edgeadapt[bench]'",
)


def gym_pair(family_cls, gym_id: str, task: list[float], n: int = 3, **kwargs):
    """Our batch and n gymnasium envs started in the same states (gymnasium's reset noise)."""
    import gymnasium as gym

    envs = [gym.make(gym_id) for _ in range(n)]
    for i, env in enumerate(envs):
        env.reset(seed=i)
    fam = family_cls(n, **kwargs)
    fam.reset(np.tile(task, (n, 1)), np.random.default_rng(0))
    qpos = np.stack([e.unwrapped.data.qpos.copy() for e in envs])
    qvel = np.stack([e.unwrapped.data.qvel.copy() for e in envs])
    fam.sim.set_state(qpos, qvel)
    if hasattr(fam, "_xy"):
        fam._xy = fam.sim.body_xpos(1)[:, :2].copy()
    return fam, envs


@needs_bench
def test_cheetah_vel_is_halfcheetah_v5_with_the_velocity_reward() -> None:
    """Observations equal gymnasium's HalfCheetah-v5 bit for bit (raw mj_step loop); the
    reward is -|v - v_goal| - 0.05 |a|^2 with v = gymnasium's info['x_velocity']."""
    from runtime.tasks.locomotion import CheetahVel

    v_goal = 1.7
    fam, envs = gym_pair(CheetahVel, "HalfCheetah-v5", [v_goal], mode="loop")
    rng = np.random.default_rng(1)
    for _ in range(30):
        action = rng.uniform(-1.0, 1.0, (3, 6))
        res = fam.step(action)
        for i, env in enumerate(envs):
            obs, _, _, _, info = env.step(action[i])
            np.testing.assert_array_equal(res.obs[i], obs.astype(np.float32))
            by_hand = -abs(info["x_velocity"] - v_goal) - 0.05 * float(np.sum(action[i] ** 2))
            assert res.reward[i] == pytest.approx(by_hand, abs=1e-5)
    assert fam.spec.obs_dim == envs[0].observation_space.shape[0] == 17


@needs_bench
def test_cheetah_rollout_path_matches_the_mj_step_loop_early_on() -> None:
    """mujoco.rollout (no warm start carried) agrees with persistent MjData to float32 for the
    first steps; chaotic contacts may separate them later, so only 20 steps are compared."""
    from runtime.tasks.locomotion import CheetahVel

    tasks = np.array([[0.5], [2.5]])
    fast, loop = CheetahVel(2, mode="rollout"), CheetahVel(2, mode="loop")
    np.testing.assert_array_equal(
        fast.reset(tasks, np.random.default_rng(5)), loop.reset(tasks, np.random.default_rng(5))
    )
    rng = np.random.default_rng(6)
    for _ in range(20):
        action = rng.uniform(-1.0, 1.0, (2, 6))
        a, b = fast.step(action), loop.step(action)
        np.testing.assert_allclose(a.obs, b.obs, atol=1e-4)
        np.testing.assert_allclose(a.reward, b.reward, atol=1e-4)


@needs_bench
def test_ant_dir_is_ant_v5_with_the_forward_term_along_the_direction() -> None:
    """Observations equal Ant-v5's (105: qpos[2:], qvel, clipped contact forces) bit for bit;
    reward = Ant-v5's with the x-velocity term replaced by (v_x, v_y) . d."""
    from runtime.tasks.locomotion import AntDir

    d = np.array([np.cos(3.0), np.sin(3.0)])  # backward-ish, 172 degrees
    fam, envs = gym_pair(AntDir, "Ant-v5", d.tolist())
    rng = np.random.default_rng(2)
    for _ in range(25):
        action = rng.uniform(-1.0, 1.0, (3, 8))
        res = fam.step(action)
        for i, env in enumerate(envs):
            obs, reward, terminated, _, info = env.step(action[i])
            np.testing.assert_array_equal(res.obs[i], obs.astype(np.float32))
            along = info["x_velocity"] * d[0] + info["y_velocity"] * d[1]
            by_hand = reward - info["x_velocity"] + along
            assert res.reward[i] == pytest.approx(by_hand, abs=1e-4)
            assert bool(res.terminated[i]) == terminated
    assert fam.spec.obs_dim == envs[0].observation_space.shape[0] == 105


@needs_bench
def test_locomotion_splits_are_the_documented_ranges() -> None:
    from runtime.tasks import make_family

    rng = np.random.default_rng(0)
    cheetah = make_family("cheetah-vel", 1)
    train, test = cheetah.sample_tasks("train", 4000, rng), cheetah.sample_tasks("test", 500, rng)
    ood = cheetah.sample_tasks("ood", 500, rng)
    assert train.min() >= 0.0 and train.max() <= 3.0 and test.min() >= 0.0 and test.max() <= 3.0
    assert ood.min() >= 3.25 and ood.max() <= 4.0
    cells = lambda t: set(np.floor(t[:, 0] / 0.3).astype(int).tolist())  # noqa: E731
    assert len(cells(test)) == 2 and cells(test).isdisjoint(cells(train))
    assert len(cells(train)) == 8

    ant = make_family("ant-dir", 1)
    angle = lambda t: np.degrees(np.arctan2(t[:, 1], t[:, 0]))  # noqa: E731
    for split in ("train", "test"):
        a = angle(ant.sample_tasks(split, 2000, rng))
        assert np.all((np.abs(a) <= 45.0) | (np.abs(a) >= 135.0))
        assert (np.abs(a) <= 45.0).any() and (np.abs(a) >= 135.0).any()  # both directions
    side = np.abs(angle(ant.sample_tasks("ood", 2000, rng)))
    assert side.min() >= 67.5 - 1e-9 and side.max() <= 112.5 + 1e-9
    assert set(ant.split_of(np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]))) <= {
        "train",
        "test",
        "ood",
        "none",
    }
    assert ant.split_of(np.array([[0.0, 1.0], [2.0, 0.0]])).tolist() == ["ood", "none"]


@needs_bench
def test_ml1_reports_success_rate_per_episode() -> None:
    """A policy that knows the goal reaches it (success 1.0); random actions do not; the shared
    evaluation protocol reports both as success_by_episode."""
    from runtime.evaluation import held_out_tasks, meta_test, rollout
    from runtime.tasks import make_family

    class GoalKnower:
        def begin_task(self, tasks_BK):
            self.tasks = tasks_BK

        def begin_episode(self):
            return None

        def act(self, obs_BO):
            move = np.clip(20.0 * (self.tasks[:, 3:6] - obs_BO[:, :3]), -1.0, 1.0)
            return np.concatenate([move, np.zeros((len(obs_BO), 1))], axis=1)

        def observe(self, *args, **kwargs):
            return None

    class Still(GoalKnower):
        def act(self, obs_BO):
            return np.zeros((len(obs_BO), 4))

    class Visitor(GoalKnower):
        """Reaches the goal, then leaves it for good after 200 steps (of 500)."""

        def begin_episode(self):
            self.t = 0

        def act(self, obs_BO):
            self.t += 1
            move = super().act(obs_BO)
            return move if self.t <= 200 else -move

    tasks = held_out_tasks(make_family("ml1-reach", 1), "test", 2, seed=0)
    report = meta_test(GoalKnower(), Still(), "ml1-reach", tasks, 1, 0, "test", None)
    assert report.success_by_episode == [1.0]
    assert report.final_success_by_episode == [1.0]  # it stays at the goal
    visit = meta_test(Visitor(), Still(), "ml1-reach", tasks, 1, 0, "test", None)
    assert visit.success_by_episode == [1.0]  # success at any step, Meta-World's metric
    assert visit.final_success_by_episode == [0.0]  # ...but no episode ends there
    assert report.nonadaptive_success_by_episode == [0.0]  # standing still reaches no goal
    assert report.random_success is not None and report.random_success < 1.0
    assert report.return_by_episode[0] > report.nonadaptive_return_by_episode[0] + 500
    assert json.loads(json.dumps(report.to_dict()))["success_by_episode"] == [1.0]
    row = rollout(GoalKnower(), "ml1-reach", tasks, 1, 0).eval_row()  # what training logs
    assert row == {"eval_return_ep1": report.return_by_episode[0], "eval_success_ep1": 1.0}
    assert len(make_family("ml1-reach", 1).task_pool("train")) == 50


@needs_bench
def test_ml1_pools_are_metaworlds_own_tasks_and_set_tasks_moves_the_goal() -> None:
    import metaworld

    from runtime.tasks import make_family

    push = make_family("ml1-push", 2)
    bench = metaworld.ML1("push-v3", seed=0)
    import pickle

    ref = np.array([pickle.loads(t.data)["rand_vec"] for t in bench.test_tasks])
    np.testing.assert_array_equal(push.task_pool("test"), ref)
    tasks = push.task_pool("train")[:2]
    push.reset(tasks, np.random.default_rng(0))
    other = push.task_pool("test")[:2]
    push.set_tasks(other)
    for env, task in zip(push.envs, other, strict=True):
        np.testing.assert_allclose(env._target_pos[:2], task[3:5])
        np.testing.assert_allclose(env.model.site("goal").pos[:2], task[3:5])


@needs_bench
def test_tiny_rl2_training_on_cheetah_vel_updates(tmp_path: Path) -> None:
    import torch

    from training.rl2 import init_state, train
    from training.rl2_config import RL2TrainConfig

    torch.set_num_threads(1)
    cfg = RL2TrainConfig.model_validate(
        {
            "env": {"name": "cheetah-vel"},
            "model": {"hidden_size": 16, "embed": [16], "head_hidden": [16]},
            "ppo": {"epochs": 1, "minibatches": 2, "lr_final": 1.0},
            "train": {
                "iterations": 2,
                "trials_per_iter": 4,
                "episodes_per_trial": 2,
                "normalizer_episodes": 4,
                "eval_every": 2,
                "checkpoint_every": 100,
                "num_threads": 1,
            },
            "eval": {"tasks": 2, "episodes": 2},
        }
    )
    state = train(cfg, tmp_path / "run", progress=False)
    init = init_state(cfg).agent.state_dict()
    moved = [k for k, v in state.agent.state_dict().items() if not torch.equal(v, init[k])]
    assert "gru.ih.weight" in moved
    assert state.env_steps == 2 * 4 * 2 * 200 and state.updates == 2 * 1 * 2
    assert "eval_return_ep2" in state.history[-1]
    assert np.isfinite(state.history[-1]["eval_return_ep2"])


@needs_bench
def test_tiny_maml_training_on_cheetah_vel_updates(tmp_path: Path) -> None:
    """MAML on an unbounded-observation MuJoCo family: the meta-update moves the weights and
    the evaluation's adapted phase is finite (the baseline clips its features, not the policy)."""
    import torch

    from training.maml import init_state, train
    from training.maml_config import MAMLTrainConfig

    torch.set_num_threads(1)
    cfg = MAMLTrainConfig.model_validate(
        {
            "env": {"name": "cheetah-vel"},
            "model": {"hidden": [16]},
            "maml": {"meta_batch": 2, "episodes_per_step": 2, "learn_inner_lr": True},
            "train": {"iterations": 2, "eval_every": 2, "checkpoint_every": 100},
            "eval": {"tasks": 2, "episodes": 3},
        }
    )
    state = train(cfg, tmp_path / "run", progress=False)
    assert not torch.equal(state.theta.detach(), init_state(cfg).theta.detach())
    assert state.inner_lr != 0.1  # the meta-learned step size moved too
    assert state.env_steps == 2 * 2 * 2 * 2 * 200  # iterations x tasks x (pre + post) x eps x H
    assert np.isfinite(state.history[-1]["eval_post"])


@needs_bench
def test_bench_envs_reports_the_vectorized_path_and_the_gymnasium_loop(capsys) -> None:
    from runtime.cli import main

    argv = ["bench", "envs", "--family", "cheetah-vel", "--json"]
    assert main([*argv, "--batch", "4", "--steps", "20", "--repeats", "1"]) == 0
    row = json.loads(capsys.readouterr().out)["families"]["cheetah-vel"]
    assert row["batch"] == 4 and row["steps"] == 20 and row["env_steps_per_s"] > 0
    assert "mujoco.rollout" in row["path"]
    assert len(row["variants"]) == 2 and all(v > 0 for v in row["variants"].values())
    assert any("gymnasium HalfCheetah-v5" in k for k in row["variants"])


def test_missing_extra_is_a_one_line_error() -> None:
    code = (
        "import sys; sys.modules['mujoco'] = None\n"
        "from runtime.cli import main\n"
        "sys.exit(main(['bench', 'envs', '--family', 'cheetah-vel']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'edgeadapt[bench]'" in lines[0], out.stderr
    assert "cheetah-vel" in lines[0]


def test_importing_the_task_registry_loads_no_simulator() -> None:
    code = (
        "import sys, runtime.tasks as t\n"
        "t.make_family('point-nav'); t.available_families()\n"
        "bad = [m for m in ('mujoco', 'metaworld', 'gymnasium', 'torch') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
