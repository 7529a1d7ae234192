"""MAML invariants: the functional policy, the inner step, the ONNX adapt graph, training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.maml_graphs import (
    ADAPT_INPUTS,
    ADAPT_OUTPUTS,
    POLICY_INPUTS,
    AdaptShape,
    MAMLPolicyGraph,
    example_adapt_inputs,
    export_adapt_graph,
    export_policy_graph,
)
from runtime.errors import ConfigError
from runtime.evaluation import rollout
from runtime.maml_policy import OnnxMAMLPolicy
from runtime.tasks import make_family
from training.maml import collect, init_state, train
from training.maml_config import MAMLTrainConfig, load_maml_config
from training.maml_inner import AdaptSettings, adapt
from training.maml_networks import (
    GaussianMLP,
    PolicyLayout,
    cholesky_solve,
    init_weights,
    policy_mean,
)
from training.maml_policy import MAMLPolicy

ROOT = Path(__file__).resolve().parent.parent
LAYOUT = PolicyLayout(2, 2, (64, 64))
SETTINGS = AdaptSettings(LAYOUT, horizon=100, gamma=0.99, ridge=1e-3, steps=1)
SHAPE = AdaptShape(episodes=4, horizon=100)  # 400 transitions
TINY = {
    "env": {"name": "nav2d"},
    "maml": {"meta_batch": 8, "episodes_per_step": 4, "learn_inner_lr": True},
    "train": {"iterations": 3, "eval_every": 3, "checkpoint_every": 2, "num_threads": 1},
    "eval": {"tasks": 4},
}


def session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def adapt_graph(tmp_path_factory: pytest.TempPathFactory) -> ort.InferenceSession:
    path = tmp_path_factory.mktemp("maml") / "adapt.onnx"
    return session(export_adapt_graph(SETTINGS, SHAPE, path))


def recorded_buffer(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """One real nav2d buffer (4 episodes flown by fresh meta-weights), as adapt inputs."""
    cfg = MAMLTrainConfig.model_validate({**TINY, "seed": seed})
    state = init_state(cfg)
    env = make_family("nav2d", 4)
    tasks = env.sample_tasks("test", 1, state.rng)
    w = state.theta.detach()[None]
    b = collect(state, tasks, w).batch  # 1 task x 4 episodes x 100 steps
    return (w, b.obs_BNO, b.action_BNA, b.reward_BN, b.mask_BN, torch.full((1, 1), 0.1))


def run_adapt(sess: ort.InferenceSession, inputs: tuple[torch.Tensor, ...]) -> dict:
    feed = {n: x.numpy().astype(np.float32) for n, x in zip(ADAPT_INPUTS, inputs, strict=True)}
    return dict(zip(ADAPT_OUTPUTS, sess.run(None, feed), strict=True))


# -- the policy -------------------------------------------------------------------------------
def test_functional_policy_equals_module() -> None:
    torch.manual_seed(0)
    module = GaussianMLP(LAYOUT, init_std=0.5)
    obs = torch.randn(3, 7, 2)
    flat = module.flat_weights()
    got = policy_mean(obs, flat.expand(3, -1), LAYOUT)
    torch.testing.assert_close(got, module(obs), rtol=0, atol=1e-6)
    assert flat.numel() == LAYOUT.num_weights


def test_policy_graph_matches_torch(tmp_path: Path) -> None:
    spec = make_family("nav2d", 1).spec
    sess = session(export_policy_graph(LAYOUT, spec, tmp_path / "policy.onnx"))
    gen = torch.Generator().manual_seed(1)
    obs, noise = torch.randn(5, 2, generator=gen), torch.randn(5, 2, generator=gen)
    weights = torch.randn(5, LAYOUT.num_weights, generator=gen) * 0.3
    feed = dict(zip(POLICY_INPUTS, (obs.numpy(), weights.numpy(), noise.numpy()), strict=True))
    action, norm, raw = sess.run(None, feed)
    ref = MAMLPolicyGraph(LAYOUT, spec)(obs, weights, noise)
    for got, want in zip((action, norm, raw), ref, strict=True):
        np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-5)
    assert np.all(np.abs(action) <= 0.1) and np.all(np.abs(norm) <= 1.0)


# -- the inner step ---------------------------------------------------------------------------
def test_cholesky_solve_matches_linalg() -> None:
    gen = torch.Generator().manual_seed(2)
    m = torch.randn(3, 8, 8, generator=gen, dtype=torch.float64)
    a = m @ m.transpose(1, 2) + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(3, 8, generator=gen, dtype=torch.float64)
    want = torch.linalg.solve(a, b)
    torch.testing.assert_close(cholesky_solve(a, b), want, rtol=1e-9, atol=1e-9)


def test_inner_step_improves_the_surrogate_on_a_fixed_batch() -> None:
    inputs = list(example_adapt_inputs(LAYOUT, SHAPE, batch=3, seed=3))
    inputs[0] = init_weights(LAYOUT, 1.0, seed=0).expand(3, -1).clone()
    out = adapt(*inputs, SETTINGS)
    assert bool(out.ok.all())
    assert torch.all(out.loss_after < out.loss_before - 1e-3), (out.loss_before, out.loss_after)
    assert torch.all(out.step_norm > 0) and torch.all(out.grad_norm > 0)


# -- the ONNX adapt graph ---------------------------------------------------------------------
def test_adapt_graph_parity_on_random_buffers(adapt_graph: ort.InferenceSession) -> None:
    for seed in range(3):
        inputs = list(example_adapt_inputs(LAYOUT, SHAPE, batch=1, seed=seed))
        inputs[0] = init_weights(LAYOUT, 1.0, seed=seed)[None]
        got = run_adapt(adapt_graph, tuple(inputs))
        want = adapt(*inputs, SETTINGS)
        np.testing.assert_array_equal(got["ok"], want.ok.numpy())
        for name in ("weights_out", "loss_before", "loss_after", "grad_norm", "step_norm"):
            ref = getattr(want, name.removesuffix("_out")).detach().numpy()
            np.testing.assert_allclose(got[name], ref, rtol=0, atol=1e-5, err_msg=name)


def test_adapt_graph_parity_on_recorded_buffers(adapt_graph: ort.InferenceSession) -> None:
    inputs = recorded_buffer()
    got = run_adapt(adapt_graph, inputs)
    want = adapt(*inputs, SETTINGS)
    assert bool(got["ok"][0])
    np.testing.assert_allclose(got["weights_out"], want.weights.numpy(), rtol=0, atol=1e-5)
    assert float(np.abs(got["weights_out"] - inputs[0].numpy()).max()) > 1e-4  # it moved


def test_masked_slots_do_not_change_the_result(adapt_graph: ort.InferenceSession) -> None:
    inputs = list(recorded_buffer())
    inputs[4] = inputs[4].clone()
    inputs[4][:, 250:] = 0.0  # 2.5 episodes flown, the rest empty
    clean = run_adapt(adapt_graph, tuple(inputs))
    dirty = [x.clone() for x in inputs]
    gen = torch.Generator().manual_seed(4)
    for k in (1, 2, 3):
        noise = torch.randn(dirty[k][:, 250:].shape, generator=gen) * 1e3
        dirty[k][:, 250:] = noise
    dirty[1][0, 300, 0] = float("nan")
    dirty[3][0, 260] = float("inf")
    got = run_adapt(adapt_graph, tuple(dirty))
    assert bool(got["ok"][0]) and bool(clean["ok"][0])
    np.testing.assert_array_equal(got["weights_out"], clean["weights_out"])


def test_nan_in_a_valid_slot_is_reported_and_keeps_old_weights(
    adapt_graph: ort.InferenceSession,
) -> None:
    inputs = [x.clone() for x in recorded_buffer()]
    inputs[3][0, 10] = float("nan")  # a valid reward
    got = run_adapt(adapt_graph, tuple(inputs))
    assert not bool(got["ok"][0])
    np.testing.assert_array_equal(got["weights_out"], inputs[0].numpy())
    want = adapt(*inputs, SETTINGS)
    assert not bool(want.ok[0])


# -- the meta-test policy ---------------------------------------------------------------------
def test_policy_adapts_between_episodes_and_end_episode_is_idempotent() -> None:
    spec = make_family("nav2d", 1).spec
    theta = init_weights(LAYOUT, 1.0, seed=0)
    policy = MAMLPolicy(theta, SETTINGS, spec, 1, 1, 0.1, np.random.default_rng(0))
    policy.begin_task(np.zeros((2, 2)))
    obs = np.zeros((2, 2), np.float32)
    for t in range(5):
        policy.act(obs)
        policy.observe(obs, obs, -np.ones(2, np.float32) * t, obs, done=t == 4)
    policy.end_episode()  # right after done=True: no second episode end
    assert policy.phase == 1 and len(policy.adapt_log) == 1
    assert not np.array_equal(policy.weights[0], theta.numpy())
    policy.begin_task(np.zeros((2, 2)))
    assert np.array_equal(policy.weights[0], theta.numpy()) and policy.phase == 0


# -- training ---------------------------------------------------------------------------------
def test_tiny_training_learns_checkpoints_and_resumes(tmp_path: Path) -> None:
    cfg = MAMLTrainConfig.model_validate(TINY)
    state = train(cfg, tmp_path / "a", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2, 3]
    # learning happened: theta moved, and the inner step raises the return it is applied to
    assert not torch.equal(state.theta.detach(), init_state(cfg).theta.detach())
    assert rows[-1]["inner_lr"] != pytest.approx(0.1, abs=1e-6)  # meta-learned step size
    assert np.mean([r["train_post"] for r in rows]) > np.mean([r["train_pre"] for r in rows])
    assert rows[-1]["eval_post"] > rows[-1]["eval_pre"]
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 0
    # same seed -> same numbers; stop at 2 + resume for 1 -> the same as 3 straight
    short = MAMLTrainConfig.model_validate({**TINY, "train": {**TINY["train"], "iterations": 2}})
    train(short, tmp_path / "b", progress=False)
    resumed = train(cfg, tmp_path / "b", resume=True, progress=False)
    torch.testing.assert_close(resumed.theta.detach(), state.theta.detach(), rtol=0, atol=0)
    assert resumed.inner_lr == state.inner_lr


def test_configs_load_and_reject_unknown_keys() -> None:
    for name in ("nav2d", "point-nav", "drone-wind", "car-friction", "cheetah-vel"):
        cfg = load_maml_config(ROOT / "configs" / "maml" / f"{name}.yaml")
        assert cfg.algo == "maml" and cfg.env.name == name
    with pytest.raises(ConfigError, match="inner_lr"):
        load_maml_config(ROOT / "configs" / "maml" / "nav2d.yaml", ["maml.inner_lr=-1"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_maml_config(ROOT / "configs" / "maml" / "nav2d.yaml", ["maml.inner_rl=0.1"])


def test_onnx_policy_flies_like_the_torch_reference(tmp_path: Path) -> None:
    """The device path (both graphs in onnxruntime, numpy only) and the torch reference, same
    tasks, same noise: same returns before and after the inner step."""
    state = init_state(MAMLTrainConfig.model_validate(TINY))
    spec, theta = state.spec, state.theta.detach()
    settings = state.settings
    adapt_path = export_adapt_graph(settings, AdaptShape(4, 100), tmp_path / "adapt.onnx")
    policy_path = export_policy_graph(state.layout, spec, tmp_path / "policy.onnx")
    tasks = make_family("nav2d", 1).sample_tasks("test", 3, np.random.default_rng(0))
    args = (spec.obs_dim, spec.act_dim, spec.horizon, 4, 1, 0.1)
    device = OnnxMAMLPolicy(policy_path, adapt_path, theta.numpy(), *args, np.random.default_rng(1))
    torch_ref = MAMLPolicy(theta, settings, spec, 4, 1, 0.1, np.random.default_rng(1))
    got = rollout(device, "nav2d", tasks, episodes=8, seed=2).returns_TE
    want = rollout(torch_ref, "nav2d", tasks, episodes=8, seed=2).returns_TE
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-2)
    assert len(device.adapt_log) == 1 and all(device.adapt_log[0]["ok"])
    assert got[:, 4:].mean() > got[:, :4].mean()  # the adapted policy does better


def test_meta_sgd_learns_one_step_size_per_weight_and_the_graph_uses_them(tmp_path: Path) -> None:
    """maml.per_weight_inner_lr: the meta-update moves the step sizes apart, the bundle's
    scalar inner_lr is then a multiplier (1), and the adapt graph (the step sizes baked in)
    matches the torch inner step."""
    maml = {**TINY["maml"], "per_weight_inner_lr": True}
    cfg = MAMLTrainConfig.model_validate({**TINY, "env": {"name": "point-nav"}, "maml": maml})
    state = train(cfg, tmp_path / "run", progress=False)
    lrs = state.log_inner_lr.detach().exp()
    assert lrs.shape == (state.layout.num_weights,) and float(lrs.std()) > 0.0
    assert state.inner_lr == 1.0 and state.settings.lr_scale is not None
    shape = AdaptShape(4, state.spec.horizon)
    sess = session(export_adapt_graph(state.settings, shape, tmp_path / "adapt.onnx"))
    inputs = list(example_adapt_inputs(state.layout, shape, batch=1, seed=3))
    inputs[0], inputs[-1] = state.theta.detach()[None].clone(), torch.ones(1, 1)
    want = adapt(*inputs, state.settings)
    got = run_adapt(sess, tuple(inputs))
    np.testing.assert_allclose(got["weights_out"], want.weights.numpy(), atol=1e-5)
    plain = adapt(*inputs, state.settings._replace(lr_scale=None))  # one step size: different
    assert not torch.allclose(plain.weights, want.weights)


def test_pretrain_trains_the_policy_without_an_inner_step(tmp_path: Path) -> None:
    """maml.pretrain: plain policy gradient on the task mixture (theta moves, one batch of
    episodes per iteration, no post-update episodes)."""
    cfg = MAMLTrainConfig.model_validate({**TINY, "maml": {**TINY["maml"], "pretrain": True}})
    state = train(cfg, tmp_path / "run", progress=False)
    assert not torch.equal(state.theta.detach(), init_state(cfg).theta.detach())
    assert all(r["train_post"] == r["train_pre"] for r in state.history)
    assert state.env_steps == 3 * 8 * 4 * state.spec.horizon  # iterations x tasks x episodes x H


def test_bench_maml_compares_maml_pretrained_and_random(tmp_path: Path) -> None:
    """``bench maml``: returns before and after 1..k inner steps for both runs, normalized
    against random (0) and nav2d's closed-form oracle (1), the pretrained one per step size."""
    from training.maml_compare import compare

    loop = {"iterations": 1, "eval_every": 1, "checkpoint_every": 1, "num_threads": 1}
    for name, pre in (("maml", False), ("pre", True)):
        maml = {**TINY["maml"], "pretrain": pre, "episodes_per_step": 2}
        cfg = MAMLTrainConfig.model_validate({**TINY, "maml": maml, "train": loop})
        train(cfg, tmp_path / name, progress=False)
    res = compare(tmp_path / "maml", tmp_path / "pre", n_tasks=3, steps=(1, 2),
                  pretrained_lrs=(0.1,))  # fmt: skip
    assert res["exploration_episodes"] == 2 and res["random"]["normalized"] == 0.0
    for curve in (res["maml"], res["pretrained"]["best"]):
        assert set(curve["return"]) == {"explore", "before", "after_1", "after_2"}
        assert all(np.isfinite(v) for v in curve["normalized"].values())
    # one inner step on the same episodes != two: the steps really are taken
    assert res["maml"]["return"]["after_1"] != res["maml"]["return"]["after_2"]
    assert res["pretrained"]["best_lr"] == 0.1


def test_step_graph_surprise_is_the_standardized_reward_and_observation_change() -> None:
    """The step graph's one-MatMul surprise equals the closed form
    ``(z_r² + sum z_d²) / (1 + O)`` with ``z_r = (r - mean) / std`` and
    ``z_d = (next - obs - mean) / std``; a NaN anywhere in the row clears ``updated``."""
    from export.maml_export import MAMLStepGraph

    spec = make_family("point-nav").spec
    layout = PolicyLayout(spec.obs_dim, spec.act_dim, (8, 8))
    stats = {
        "reward_mean": np.float32(-1.5), "reward_std": np.float32(0.7),
        "delta_mean": np.array([0.01, -0.02], np.float32),
        "delta_std": np.array([0.05, 0.08], np.float32),
    }  # fmt: skip
    graph = MAMLStepGraph(MAMLPolicyGraph(layout, spec), stats)
    rng = np.random.default_rng(0)
    tr = rng.normal(size=(6, 2 * spec.obs_dim + spec.act_dim + 1)).astype(np.float32)
    tr[5, 2] = np.nan
    o, a = spec.obs_dim, spec.act_dim
    z_r = (tr[:, o + a] - stats["reward_mean"]) / stats["reward_std"]
    z_d = (tr[:, o + a + 1 :] - tr[:, :o] - stats["delta_mean"]) / stats["delta_std"]
    want = (z_r**2 + (z_d**2).sum(axis=1)) / (1 + o)
    w = init_weights(layout, 1.0, 0)[None].expand(6, -1)
    obs, noise = torch.zeros(6, o), torch.zeros(6, a)
    out = graph(torch.from_numpy(tr), obs, noise, w)
    np.testing.assert_allclose(out[4][:5].numpy(), want[:5], rtol=1e-5)
    assert out[5].tolist() == [True] * 5 + [False]
    torch.testing.assert_close(out[3], w)  # the weights pass through unchanged
