"""RL²: the GRU cell, the hidden state across episodes and trials, training, ONNX graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.rl2_graphs import check_parity, export_rl2_graphs, parity_failures
from runtime.errors import ConfigError
from runtime.evaluation import held_out_tasks
from runtime.tasks import make_family
from runtime.transition import encode_transition
from training.rl2 import (
    collect_trials,
    compute_gae,
    init_state,
    load_rl2_run,
    ppo_losses,
    sample_trial_tasks,
    train,
)
from training.rl2_config import RL2TrainConfig, load_rl2_config
from training.rl2_networks import GRUCell
from training.rl2_policy import RL2Policy

ROOT = Path(__file__).resolve().parent.parent


def tiny_config(**train: int) -> RL2TrainConfig:
    loop = {
        "iterations": 3,
        "trials_per_iter": 8,
        "episodes_per_trial": 2,
        "normalizer_episodes": 16,
        "eval_every": 3,
        "checkpoint_every": 100,
        **train,
    }
    return RL2TrainConfig.model_validate(
        {
            "env": {"name": "point-nav"},
            "model": {"hidden_size": 16, "embed": [16], "head_hidden": [16]},
            "ppo": {"epochs": 2, "minibatches": 2, "lr_final": 1.0},
            "train": loop,
            "eval": {"tasks": 4},
        }
    )


def test_gru_cell_equals_torch_gru_cell():
    torch.manual_seed(0)
    ref = torch.nn.GRUCell(7, 5)
    cell = GRUCell(7, 5)
    cell.load_from_torch(ref)
    x, h = torch.randn(9, 7), torch.randn(9, 5)
    for _ in range(4):  # a few recurrent steps, so errors would compound
        h_ref, h = ref(x, h), cell(x, h)
        assert torch.allclose(h, h_ref, atol=1e-6)
        x = torch.randn(9, 7)


def test_hidden_state_carries_across_episodes_and_resets_per_trial():
    state = init_state(tiny_config())
    env = make_family("point-nav", 3)
    spec = env.spec
    tasks = held_out_tasks(env, "test", 3, seed=0)
    rng = np.random.default_rng(0)

    def first_actions(policy: RL2Policy, episodes: int) -> list[np.ndarray]:
        out = []
        for _ in range(episodes):
            obs = env.reset(tasks, rng)
            out.append(policy.act(obs))
            for _ in range(spec.horizon):
                action = policy.act(obs)
                res = env.step(action)
                policy.observe(obs, action, res.reward, res.obs)
                obs = res.obs
        return out

    policy = RL2Policy(state.agent, spec)
    policy.begin_task(tasks)
    ep1, ep2 = first_actions(policy, 2)
    assert torch.count_nonzero(policy.h) > 0
    assert not np.allclose(ep1, ep2)  # same start obs, different h: the state carried over
    policy.begin_task(tasks)  # a new trial: back to zeros, the first action repeats
    assert torch.count_nonzero(policy.h) == 0
    np.testing.assert_array_equal(policy.act(env.reset(tasks, rng)), ep1)

    fixed = RL2Policy(state.agent, spec, adaptive=False)
    fixed.begin_task(tasks)
    a1, a2 = first_actions(fixed, 2)
    np.testing.assert_array_equal(a1, a2)


def test_episode_end_is_inferred_from_the_horizon_or_given():
    state = init_state(tiny_config())
    agent, spec = state.agent, make_family("point-nav").spec
    obs = np.zeros((2, 2), np.float32)
    act = np.full((2, 2), 0.5, np.float32)
    rew = np.array([-1.0, -0.5], np.float32)
    x = torch.from_numpy(encode_transition(obs, act, rew, obs))
    policy = RL2Policy(agent, spec)
    policy.begin_task(np.zeros((2, 2)))
    h = agent.initial_state(2)
    with torch.no_grad():
        for t in range(spec.horizon):
            policy.observe(obs, act, rew, obs)
            h = agent.absorb(x, torch.full((2, 1), float(t == spec.horizon - 1)), h)
        assert torch.equal(policy.h, h)
        policy.observe(obs, act, rew, obs, done=np.array([True, False]))
        h = agent.absorb(x, torch.tensor([[1.0], [0.0]]), h)
    assert torch.equal(policy.h, h)


def test_full_trial_unroll_reproduces_collection():
    """BPTT over whole trials recomputes the states the actions were taken under (h carried
    across the episode boundary): the PPO ratio starts at exactly 1."""
    state = init_state(tiny_config())
    env = make_family("point-nav", 8)
    batch = collect_trials(state, sample_trial_tasks(state))
    assert batch.obs.shape[:2] == (8, 2 * env.spec.horizon)
    adv, ret = compute_gae(state, batch)
    losses = ppo_losses(state, batch, adv, ret)
    assert float(losses["approx_kl"]) < 1e-10
    assert float(losses["clipfrac"]) == 0.0


def test_tiny_training_learns_and_is_deterministic(tmp_path: Path):
    cfg = tiny_config()
    first = train(cfg, tmp_path / "a", progress=False)
    init = init_state(cfg).agent.state_dict()
    moved = [k for k, v in first.agent.state_dict().items() if not torch.equal(v, init[k])]
    assert "gru.ih.weight" in moved and "actor.2.weight" in moved and "err_scale" in moved
    assert first.env_steps == 3 * 8 * 2 * 20
    assert first.updates == 3 * 2 * 2
    rows = [r for r in first.history]
    assert len(rows) == 3 and "eval_return_ep2" in rows[-1]
    assert all(np.isfinite(r["loss_actor"]) and np.isfinite(r["loss_aux"]) for r in rows)
    assert rows[0]["loss_critic"] != rows[-1]["loss_critic"]
    assert (tmp_path / "a" / "learning_curve.png").is_file()
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 3

    second = train(cfg, tmp_path / "b", progress=False)
    skip = {"wall_s", "env_steps_per_s"}
    for a, b in zip(first.history, second.history, strict=True):
        assert {k: v for k, v in a.items() if k not in skip} == {
            k: v for k, v in b.items() if k not in skip
        }


def test_resume_gives_the_same_numbers_as_one_run(tmp_path: Path):
    straight = train(tiny_config(iterations=4, eval_every=100), tmp_path / "s", progress=False)
    train(tiny_config(iterations=2, eval_every=100), tmp_path / "r", progress=False)
    resumed = train(
        tiny_config(iterations=4, eval_every=100), tmp_path / "r", resume=True, progress=False
    )
    assert resumed.iteration == 4
    assert resumed.history[-1]["loss_critic"] == straight.history[-1]["loss_critic"]
    loaded = load_rl2_run(tmp_path / "r").agent.state_dict()
    for k, v in straight.agent.state_dict().items():
        assert torch.equal(v, loaded[k]), k


def test_onnx_step_and_act_graphs_match_torch(tmp_path: Path):
    state = init_state(tiny_config())
    spec = make_family("point-nav").spec
    paths = export_rl2_graphs(state.agent, spec, tmp_path)
    tasks = held_out_tasks(make_family("point-nav"), "test", 4, seed=0)
    result = check_parity(state.agent, spec, paths, "point-nav", tasks, rows=2000)
    assert parity_failures(result) == []
    assert result["step_recorded"]["h_out"] <= 1e-5 and result["act_random"]["action"] <= 1e-5


def test_non_finite_transition_is_not_absorbed(tmp_path: Path):
    state = init_state(tiny_config())
    spec = make_family("point-nav").spec
    path = export_rl2_graphs(state.agent, spec, tmp_path)["step"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    transition = np.zeros((4, 7), np.float32)
    transition[1, 4] = np.nan  # reward
    transition[2, 0] = np.inf  # obs
    done = np.zeros((4, 1), np.float32)
    done[3, 0] = np.nan
    h = np.zeros((4, 16), np.float32)
    action, _, h_out, _, updated = sess.run(
        None, {"transition": transition, "done": done, "h": h, "obs": np.zeros((4, 2), np.float32)}
    )
    assert updated.tolist() == [True, False, False, False]
    assert np.isfinite(h_out[0]).all() and np.isfinite(action[0]).all()
    assert ((action[0] >= spec.act_low) & (action[0] <= spec.act_high)).all()


def test_configs_load_and_reject_unknown_keys():
    for name in ("point-nav", "drone-wind", "car-friction", "cheetah-vel"):
        cfg = load_rl2_config(ROOT / "configs" / "rl2" / f"{name}.yaml")
        assert cfg.algo == "rl2" and cfg.env.name == name
        assert cfg.eval.oracle_run == f"runs/{name}-oracle"
    with pytest.raises(ConfigError, match=r"ppo\.lr_typo"):
        load_rl2_config(ROOT / "configs" / "rl2" / "point-nav.yaml", ["ppo.lr_typo=1"])
