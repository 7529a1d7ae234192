"""PEARL training invariants: gradient routing, determinism, checkpoints, that learning happens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime.evaluation import held_out_tasks, rollout
from runtime.tasks import make_family
from training.checkpoint import load_run
from training.config import TrainConfig
from training.evaluate import policy_for
from training.losses import actor_losses, critic_losses
from training.pearl import init_state, sample_batch, train
from training.registry import validate_run_config

TINY = {
    "model": {"encoder_hidden": [32, 32], "hidden": [32, 32]},
    "sac": {"batch_size": 32},
    "pearl": {"meta_batch": 4, "context_size": 16},
    "train": {
        "iterations": 4,
        "initial_episodes": 1,
        "tasks_per_iter": 4,
        "updates_per_iter": 5,
        "eval_every": 2,
        "checkpoint_every": 2,
        "num_threads": 1,
    },
    "eval": {"tasks": 4, "episodes": 2},
}


def tiny_config(algo: str = "pearl", **sections: dict) -> TrainConfig:
    raw: dict = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        raw.setdefault(key, {}).update(value)
    return validate_run_config({**raw, "algo": algo}, source="test")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    train(tiny_config(), run_dir, progress=False)
    return run_dir


def _grads_after(loss: torch.Tensor, module: torch.nn.Module) -> list[torch.Tensor | None]:
    for p in module.parameters():
        p.grad = None
    loss.backward(retain_graph=True)
    return [p.grad for p in module.parameters()]


def test_encoder_gets_no_gradient_from_the_actor_loss() -> None:
    state = init_state(tiny_config())
    from training.pearl import collect_initial

    collect_initial(state)
    batch = sample_batch(state)
    crit = critic_losses(
        state.nets, batch, gamma=0.99, reward_scale=1.0, kl_weight=0.1, prior_var=1.0
    )
    act = actor_losses(state.nets, batch.obs, crit.z_det, target_entropy=-2.0)
    encoder = state.nets.encoder
    assert all(g is None for g in _grads_after(act.loss_actor, encoder))
    # ...while the critic loss does reach it (the test can fail).
    grads = _grads_after(crit.loss_critic, encoder)
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_short_training_moves_losses_and_counters(tiny_run: Path) -> None:
    rows = [json.loads(x) for x in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["updates"] == 4 * 5
    assert rows[-1]["env_steps"] > rows[0]["env_steps"]
    assert rows[0]["loss_critic"] != rows[-1]["loss_critic"]
    assert "eval_return_ep1" in rows[1]
    assert (tiny_run / "checkpoints" / "latest.pt").is_file()
    assert (tiny_run / "config.yaml").is_file()
    # The networks changed from their initialization.
    fresh = init_state(tiny_config()).nets.actor.state_dict()
    trained = load_run(tiny_run).nets.actor.state_dict()
    assert any(not torch.equal(fresh[k], trained[k]) for k in fresh)


def test_learning_happens_on_point_nav(tmp_path: Path) -> None:
    """A few hundred SAC updates must beat a random policy clearly (fast oracle run)."""
    cfg = tiny_config(
        "oracle",
        model={"hidden": [64, 64]},
        sac={"batch_size": 64, "lr_actor": 3e-3, "lr_critic": 3e-3},
        train={"iterations": 10, "updates_per_iter": 60, "tasks_per_iter": 8, "eval_every": 10},
    )
    state = train(cfg, tmp_path / "run", progress=False)
    final = state.history[-1]["eval_return_ep1"]
    assert final > -10.0, f"no learning: eval return {final} (random policy scores about -20)"


def test_save_load_gives_identical_deterministic_actions(tiny_run: Path) -> None:
    run_a, run_b = load_run(tiny_run), load_run(tiny_run)
    family = make_family("point-nav")
    tasks = held_out_tasks(family, "test", 4, seed=3)
    res_a = rollout(policy_for(run_a), "point-nav", tasks, episodes=2, seed=5)
    res_b = rollout(policy_for(run_b), "point-nav", tasks, episodes=2, seed=5)
    np.testing.assert_array_equal(res_a.returns_TE, res_b.returns_TE)


def test_same_seed_gives_identical_metrics(tmp_path: Path, tiny_run: Path) -> None:
    train(tiny_config(), tmp_path / "again", progress=False)
    a = (tiny_run / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()
    assert [_strip_timing(r) for r in a] == [_strip_timing(r) for r in b]


def _strip_timing(row: str) -> dict:
    return {k: v for k, v in json.loads(row).items() if "wall" not in k and "per_s" not in k}


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path, tiny_run: Path) -> None:
    cfg_half = tiny_config(train={"iterations": 2})
    train(cfg_half, tmp_path / "resumed", progress=False)
    train(tiny_config(), tmp_path / "resumed", resume=True, progress=False)
    full = load_run(tiny_run).nets.actor.state_dict()
    resumed = load_run(tmp_path / "resumed").nets.actor.state_dict()
    for key in full:
        torch.testing.assert_close(full[key], resumed[key], rtol=0, atol=0)


def test_episode_contexts_stand_for_the_first_k_transitions_of_a_recent_episode() -> None:
    from training.buffer import MultiTaskReplay, TransitionBatch

    horizon, capacity, size = 5, 23, 8  # capacity not a multiple of the horizon: wraps around
    buf = MultiTaskReplay(2, capacity, obs_dim=1, act_dim=1)
    step = 0
    for _ in range(7):  # 7 episodes: the ring buffer has wrapped
        for t in range(horizon):
            # obs = global step, action = step within the episode
            buf.add(
                np.array([0, 1]),
                TransitionBatch(
                    np.full((2, 1), step, np.float32),
                    np.full((2, 1), t, np.float32),
                    np.zeros(2, np.float32),
                    np.zeros((2, 1), np.float32),
                    np.zeros(2, np.float32),
                ),
            )
            step += 1
    rng = np.random.default_rng(0)
    seen_long = seen_short = False
    for _ in range(200):
        ctx, weight = buf.sample_episode_context(np.array([0, 1]), size, horizon, 3, rng)
        for row in range(2):
            obs, w = ctx.obs[row, :, 0], weight[row]
            used = obs[w > 0]
            k = round(float(w.sum()))  # the weights add up to the k transitions stood for
            # Some start of the 3 newest episodes has all used transitions among its first k,
            # never past the newest one.
            starts = [step - e * horizon for e in (1, 2, 3)]
            assert any(np.all((used >= s) & (used < s + k)) and s + k <= step for s in starts), (
                used,
                k,
            )
            if k <= size:
                seen_short = True
                assert ctx.action[row, 0, 0] == 0, "a short context starts an episode"
                np.testing.assert_array_equal(used, used[0] + np.arange(k))
                assert np.all(w[:k] == 1) and np.all(w[k:] == 0)
            else:
                seen_long = True
                assert len(np.unique(used)) == size, "k > size: distinct transitions"
                np.testing.assert_allclose(w, k / size)
    assert seen_short and seen_long


def test_weight_averages_are_what_the_run_deploys_and_resume_exactly(tmp_path: Path) -> None:
    """``train.average_decay``: the checkpoint keeps the trained weights (to resume) and their
    moving averages, which ``load_run`` (export, evaluate) loads; a resumed run ends where one
    straight run does."""
    avg = {"average_decay": 0.9}
    train(tiny_config(train=avg), tmp_path / "straight", progress=False)
    data = torch.load(tmp_path / "straight/checkpoints/latest.pt", weights_only=True)
    assert set(data["averaged"]) == {"actor", "encoder"}
    deployed = load_run(tmp_path / "straight").nets
    for name in ("actor", "encoder"):
        got = getattr(deployed, name).state_dict()
        for key, value in got.items():
            torch.testing.assert_close(value, data["averaged"][name][key], rtol=0, atol=0)
        trained = data["nets"][name]
        assert any(not torch.equal(got[k], trained[k]) for k in got)  # an average, not a copy
    train(tiny_config(train={**avg, "iterations": 2}), tmp_path / "resumed", progress=False)
    train(tiny_config(train=avg), tmp_path / "resumed", resume=True, progress=False)
    resumed = torch.load(tmp_path / "resumed/checkpoints/latest.pt", weights_only=True)
    for part in ("nets", "averaged"):
        for name, weights in resumed[part].items():
            for key, value in weights.items():
                torch.testing.assert_close(value, data[part][name][key], rtol=0, atol=0)


def test_an_average_step_moves_each_weight_by_one_minus_the_decay() -> None:
    from training.pearl import update_averages

    state = init_state(tiny_config(train={"average_decay": 0.75}))
    before = {k: v.clone() for k, v in state.averaged["actor"].state_dict().items()}
    with torch.no_grad():
        for p in state.nets.actor.parameters():
            p.add_(1.0)
    update_averages(state)
    for key, value in state.averaged["actor"].state_dict().items():
        live = state.nets.actor.state_dict()[key]
        torch.testing.assert_close(value, 0.75 * before[key] + 0.25 * live)


def test_average_modules_picks_what_is_averaged_and_the_rest_deploys_as_trained(
    tmp_path: Path,
) -> None:
    cfg = tiny_config(train={"average_decay": 0.9, "average_modules": ["actor"], "iterations": 2})
    train(cfg, tmp_path / "run", progress=False)
    data = torch.load(tmp_path / "run/checkpoints/latest.pt", weights_only=True)
    assert set(data["averaged"]) == {"actor"}
    deployed = load_run(tmp_path / "run").nets
    for key, value in deployed.encoder.state_dict().items():
        torch.testing.assert_close(value, data["nets"]["encoder"][key], rtol=0, atol=0)
    for key, value in deployed.actor.state_dict().items():
        torch.testing.assert_close(value, data["averaged"]["actor"][key], rtol=0, atol=0)
