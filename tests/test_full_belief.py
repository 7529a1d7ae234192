"""Factors with rank-one precision directions (``model.factor_rank`` > 0): the full-covariance
belief in torch (training), numpy (device) and the fused ONNX step graph agree; the bundle
verifies, runs and keeps the runtime's guarantees."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundle_fixtures import SMALL, cached_bundle, cached_run
from torch.distributions import MultivariateNormal, kl_divergence

from export.graphs import Dims, FullStepGraph
from export.onnx_export import export_graph
from export.reference import dims_of, random_step_inputs, reference_modules, torch_step
from export.verify import verify
from runtime.agent import Agent
from runtime.bundle import read_manifest
from runtime.posterior import (
    FullBelief,
    full_product_of_gaussians,
    full_surprise,
    prior_full_belief,
    update_full_belief,
)
from runtime.providers import CPU
from runtime.session import GraphSession
from runtime.tasks import make_family
from training.checkpoint import load_run
from training.networks import ContextEncoder, TanhGaussianActor
from training.posterior import full_product_of_gaussians as torch_full_pog
from training.posterior import kl_to_prior, product_of_gaussians, sample

FULL = (*SMALL, "model.factor_rank=1")


def _factors(seed: int, n: int = 9, z: int = 5, rank: int = 2):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(3, n, z, generator=g)
    var = torch.rand(3, n, z, generator=g) * 2 + 0.01
    u = torch.randn(3, n, z, rank, generator=g) * 5
    return mu, var, u


@pytest.mark.parametrize("diagonal", [True, False])
def test_sequential_kalman_updates_equal_the_closed_form_in_any_order(diagonal):
    mu, var, u = _factors(0)
    var = var if diagonal else None
    post = torch_full_pog(mu, var, u, torch.ones(3, 9), prior_var=2.0)
    for order in (range(9), reversed(range(9)), [4, 0, 8, 2, 6, 1, 7, 3, 5]):
        b = prior_full_belief(3, 5, prior_var=2.0)
        for t in order:
            v = None if var is None else var[:, t].numpy()
            b = update_full_belief(b, mu[:, t].numpy(), v, u[:, t].numpy(), 1.0, 2.0)
        np.testing.assert_allclose(b.mean, post.mean_BZ.numpy(), atol=1e-4)
        np.testing.assert_allclose(b.var, post.var_BZ.numpy(), rtol=1e-3, atol=1e-7)
        assert np.all(b.var < 2.0)  # evidence only adds precision
    for row in range(3):
        v = None if var is None else var[row].numpy()
        mean, cov = full_product_of_gaussians(mu[row].numpy(), v, u[row].numpy(), 2.0)
        np.testing.assert_allclose(mean, post.mean_BZ[row].numpy(), atol=1e-4)
        np.testing.assert_allclose(np.diag(cov), post.var_BZ[row].numpy(), rtol=1e-3)


def test_zero_directions_reduce_to_the_diagonal_product():
    mu, var, _ = _factors(1)
    full = torch_full_pog(mu, var, torch.zeros(3, 9, 5, 1), torch.ones(3, 9), 1.5)
    diag = product_of_gaussians(mu, var, 1.5)
    torch.testing.assert_close(full.mean_BZ, diag.mean_BZ)
    torch.testing.assert_close(full.var_BZ, diag.var_BZ)
    torch.testing.assert_close(kl_to_prior(full, 1.5), kl_to_prior(diag, 1.5))


def test_one_direction_pins_down_a_line_the_diagonal_cannot():
    """A measurement of z1 + z2 = 2 (a line): the posterior concentrates on the line, and its
    correlation is negative; no product of diagonal factors can express that correlation."""
    mu = torch.tensor([[[1.0, 1.0]]])
    u = torch.tensor([[[[100.0], [100.0]]]])
    post = torch_full_pog(mu, None, u, torch.ones(1, 1), 1.0)
    prec = post.prec_chol_BZZ @ post.prec_chol_BZZ.transpose(-1, -2)
    cov = torch.linalg.inv(prec)[0]
    assert torch.allclose(post.mean_BZ[0].sum(), torch.tensor(2.0), atol=1e-3)
    assert cov[0, 1] / (cov[0, 0] * cov[1, 1]).sqrt() < -0.99


def test_full_kl_and_sampling_match_the_distribution():
    mu, var, u = _factors(2)
    post = torch_full_pog(mu, var, u, torch.rand(3, 9), prior_var=2.0)
    prec = post.prec_chol_BZZ @ post.prec_chol_BZZ.transpose(-1, -2)
    q = MultivariateNormal(post.mean_BZ, precision_matrix=prec)
    prior = MultivariateNormal(torch.zeros(5), 2.0 * torch.eye(5))
    want = kl_divergence(q, prior)
    torch.testing.assert_close(kl_to_prior(post, 2.0), want, rtol=1e-4, atol=1e-4)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample(post, g) for _ in range(20_000)])
    torch.testing.assert_close(draws.mean(0), post.mean_BZ, atol=0.05, rtol=0.0)
    emp_var = draws.var(0)
    assert torch.all((emp_var / post.var_BZ - 1.0).abs() < 0.1)


def test_forgetting_inflates_the_covariance_toward_the_prior_and_keeps_the_mean():
    mu, var, u = _factors(3)
    b = prior_full_belief(3, 5, 1.0)
    for t in range(9):
        b = update_full_belief(b, mu[:, t].numpy(), var[:, t].numpy(), u[:, t].numpy(), 1.0, 1.0)
    zero = np.zeros((3, 5), dtype=np.float32)
    far = update_full_belief(b, zero, np.full((3, 5), 1e12, np.float32), None, 0.5, 1.0)
    np.testing.assert_allclose(far.mean, b.mean, atol=1e-5)
    np.testing.assert_allclose(far.cov_BZZ, 0.5 * b.cov_BZZ + 0.5 * np.eye(5), atol=1e-5)


def test_surprise_is_about_one_for_evidence_drawn_from_the_belief():
    rng = np.random.default_rng(0)
    b = prior_full_belief(4000, 3, 1.0)
    u = rng.normal(size=(4000, 3, 1)).astype(np.float32)
    z = rng.normal(size=(4000, 3)).astype(np.float32)  # a latent drawn from the prior
    y = np.einsum("bzr,bz->br", u, z) + rng.normal(size=(4000, 1))  # unit measurement noise
    # a mu whose projection on u is y: mu = u y / |u|^2
    mu = (u[..., 0] * (y / np.einsum("bzr,bzr->br", u, u))).astype(np.float32)
    assert 0.9 < full_surprise(b, mu, None, u).mean() < 1.1
    assert full_surprise(b, mu + 10 * u[..., 0], None, u).mean() > 10


SPEC = make_family("point-nav", 1).spec


def _step_module(diagonal: bool, rank: int, gain: float = 1.0) -> FullStepGraph:
    """The full-belief step graph on small untrained networks. ``gain`` scales the encoder's
    last layer: at 30 the directions reach |u| ~ 20 and the variances min_var, so beliefs get
    confident and the update ill-conditioned."""
    torch.manual_seed(0)
    encoder = ContextEncoder(SPEC.obs_dim, SPEC.act_dim, 5, (32, 32), 1e-4, rank, diagonal)
    with torch.no_grad():
        encoder.net[-1].weight.mul_(gain)
    actor = TanhGaussianActor(SPEC.obs_dim, 5, SPEC.act_dim, (32, 32))
    return FullStepGraph(encoder, actor, SPEC, 1.0).eval()


def _factor(module: FullStepGraph, transition: np.ndarray) -> tuple:
    with torch.no_grad():
        f = module.factor(torch.from_numpy(transition))
    return tuple(None if t is None else t.numpy() for t in f)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """As ``edgeadapt verify``: absolute up to 1, relative beyond."""
    return float(np.max(np.abs(got - want) / np.maximum(1.0, np.abs(want))))


@pytest.mark.parametrize(("diagonal", "rank"), [(True, 1), (False, 2)])
def test_closed_form_step_equals_sequential_kalman_updates_along_a_trajectory(
    diagonal, rank, tmp_path
):
    """The step graph absorbs a factor in closed form (one inverse); runtime.posterior absorbs
    it by Z + R rank-one Kalman updates. Torch and onnxruntime, each fed back its own belief
    for 30 steps with and without forgetting, stay on the sequential posterior."""
    module = _step_module(diagonal, rank, gain=5.0)
    dims = Dims(SPEC.obs_dim, SPEC.act_dim, 5, rank, diagonal, 1.0)
    spec = export_graph(module, "step", dims, tmp_path / "step.onnx")
    session = GraphSession(tmp_path / "step.onnx", spec, providers=[CPU])
    rng = np.random.default_rng(0)
    seq = prior_full_belief(4, 5, 1.0)
    ours = {"torch": seq, "ort": seq}
    for t in range(30):
        inputs = random_step_inputs(dims, SPEC, 4, rng, 1.0, 0.0)
        lam = 0.8 if t % 3 == 0 else 1.0
        factor = _factor(module, inputs["transition"])
        for name, belief in ours.items():
            feeds = {**inputs, "cov": belief.cov_BZZ, "mean": belief.mean_BZ}
            feeds["forget"] = np.full_like(inputs["forget"], lam)
            out = torch_step(module, feeds, dims) if name == "torch" else session.run_feeds(feeds)
            np.testing.assert_allclose(out["surprise"], full_surprise(belief, *factor), rtol=1e-4)
            assert out["updated"].all()
            np.testing.assert_array_equal(out["cov_out"], np.swapaxes(out["cov_out"], 1, 2))
            ours[name] = FullBelief(out["cov_out"], out["mean_out"], belief.count_B + 1)
        seq = update_full_belief(seq, *factor, lam, 1.0)
        for belief in ours.values():
            np.testing.assert_allclose(belief.cov_BZZ, seq.cov_BZZ, rtol=1e-4, atol=1e-7)
            np.testing.assert_allclose(belief.mean_BZ, seq.mean_BZ, rtol=1e-4, atol=1e-5)
    assert np.all(seq.var < 0.6)  # the beliefs moved (prior variance 1)


def test_closed_form_step_keeps_float64_accuracy_on_ill_conditioned_beliefs():
    """Confident random beliefs (covariance eigenvalues down to 1e-4) and sharp factors: the
    step graph's posterior against the float64 product of precision matrices. Measured
    2.2e-6 on the mean; the same closed form in float32 is off by 5.5e-5 there (and the
    sequential float32 Kalman updates by 3.1e-5)."""
    module = _step_module(True, 1, gain=30.0)
    dims = Dims(SPEC.obs_dim, SPEC.act_dim, 5, 1, True, 1.0)
    inputs = random_step_inputs(dims, SPEC, 2000, np.random.default_rng(1), 1.0, 0.0)
    out = torch_step(module, inputs, dims)
    mu, var, u = (t.astype(np.float64) for t in _factor(module, inputs["transition"]))
    lam = inputs["forget"].astype(np.float64)[:, :, None]
    prior_prec = np.linalg.inv(lam * inputs["cov"] + (1.0 - lam) * np.eye(5))
    uu = u @ np.swapaxes(u, -1, -2)
    cov = np.linalg.inv(prior_prec + uu + np.eye(5) / var[:, None, :])
    info = prior_prec @ inputs["mean"][..., None] + uu @ mu[..., None] + (mu / var)[..., None]
    assert np.abs(u).max() > 10 and var.min() < 2e-4  # the factors are sharp
    assert _rel_err(out["cov_out"], cov) < 1e-6
    assert _rel_err(out["mean_out"], (cov @ info)[..., 0]) < 1e-5


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    return cached_run(tmp_path_factory, FULL)


@pytest.fixture(scope="module")
def full_bundle(tmp_path_factory):
    return cached_bundle(tmp_path_factory, FULL, int8=True)


def test_fused_full_step_equals_the_numpy_belief_and_the_actor(full_run):
    run = load_run(full_run)
    dims, cfg = dims_of(run), run.config
    assert dims.full and dims.rank == 1
    step = reference_modules(run)["step"]
    rng = np.random.default_rng(0)
    belief = prior_full_belief(4, cfg.model.latent_dim, cfg.model.prior_var)
    for _ in range(6):
        inputs = random_step_inputs(dims, run.family.spec, 4, rng, cfg.model.prior_var, 0.0)
        inputs["cov"], inputs["mean"] = belief.cov_BZZ, belief.mean_BZ
        inputs["forget"][:] = 0.9
        out = torch_step(step, inputs, dims)
        with torch.no_grad():
            f = run.nets.encoder.factor(torch.from_numpy(inputs["transition"]))
        factor = (f.mu.numpy(), f.var.numpy(), f.u.numpy())
        np.testing.assert_allclose(out["surprise"], full_surprise(belief, *factor), rtol=1e-4)
        belief = update_full_belief(belief, *factor, 0.9, cfg.model.prior_var)
        np.testing.assert_allclose(out["cov_out"], belief.cov_BZZ, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(out["mean_out"], belief.mean_BZ, rtol=1e-4, atol=1e-5)
        with torch.no_grad():
            want = run.nets.actor.deterministic(
                torch.from_numpy(inputs["obs"]), torch.from_numpy(belief.mean_BZ)
            ).numpy()
        np.testing.assert_allclose(out["action_norm"], want, atol=1e-5)
        assert out["updated"].all()


def test_full_bundle_verifies_with_parity_and_declares_its_belief(full_bundle, full_run):
    manifest = read_manifest(full_bundle)
    assert manifest.adaptation.full_belief and manifest.adaptation.factor_rank == 1
    step = manifest.graph("step")
    assert [t.name for t in step.inputs] == ["transition", "cov", "mean", "forget", "obs"]
    assert step.input("cov").shape == ["batch", 5, 5]
    assert [t.name for t in manifest.graph("encoder").outputs] == ["mu", "var", "u"]
    res = verify(full_bundle, run_dir=full_run)
    assert res.ok, res.reasons
    assert res.parity["max_abs_err"] <= 1e-5


def test_full_bundle_agent_adapts_skips_nan_and_resets(full_bundle):
    agent = Agent.load(full_bundle)
    m = read_manifest(full_bundle)
    obs = np.zeros(m.obs.dim, dtype=np.float32)
    b0 = agent.belief
    np.testing.assert_array_equal(b0.mean, 0.0)
    np.testing.assert_allclose(b0.var, m.adaptation.prior_var)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = agent.act(obs)
        nxt = (obs + 0.1 * rng.normal(size=obs.shape)).astype(np.float32)
        agent.observe(obs, a, float(rng.normal()), nxt)
        obs = nxt
        assert np.isfinite(a).all() and np.all(np.abs(a) <= 1.0)
    b = agent.belief
    assert b.count == 20 and np.all(b.var < m.adaptation.prior_var) and np.isfinite(b.entropy)
    bad = obs.copy()
    bad[0] = np.nan
    agent.observe(obs, agent.act(obs), 0.0, bad)
    after = agent.belief
    assert after.skipped == 1 and after.count == 20
    np.testing.assert_array_equal(after.mean, b.mean)
    assert np.isfinite(agent.act(bad)).all()
    agent.reset()
    np.testing.assert_array_equal(agent.belief.mean, 0.0)
    np.testing.assert_allclose(agent.belief.var, m.adaptation.prior_var)


def test_torch_rebuilt_from_a_full_bundle_matches_its_step_graph(full_bundle, full_run):
    """``bench runtime`` times a torch step rebuilt from the bundle's weights: for a full
    belief it must be the same function as the ONNX graph."""
    from export.torch_reference import step_module_from_bundle
    from runtime.providers import CPU
    from runtime.session import GraphSession

    run = load_run(full_run)
    dims = dims_of(run)
    inputs = random_step_inputs(dims, run.family.spec, 64, np.random.default_rng(5), 1.0, 0.0)
    rebuilt = torch_step(step_module_from_bundle(full_bundle), inputs, dims)
    spec = read_manifest(full_bundle).graph("step")
    got = GraphSession(full_bundle / spec.file, spec, providers=[CPU]).run_feeds(inputs)
    for name in ("action", "cov_out", "mean_out", "surprise"):
        np.testing.assert_allclose(got[name], rebuilt[name], rtol=1e-4, atol=1e-5)


def test_bench_belief_on_a_full_bundle_keeps_constant_state(full_bundle):
    from runtime.bench import belief_scaling

    out = belief_scaling(full_bundle, lengths=(10, 100), reps=20)
    z = read_manifest(full_bundle).adaptation.latent_dim
    assert [r["context"] for r in out["rows"]] == [10, 100]
    assert all(r["o1_step_us"] > 0 and r["naive_step_us"] > 0 for r in out["rows"])
    assert out["belief_state_bytes"] == 4 * (z * z + z) + 8


def test_a_manifest_whose_step_graph_does_not_match_factor_rank_is_refused(full_bundle, tmp_path):
    import json
    import shutil

    from runtime.bundle import BundleError

    copy = tmp_path / "b"
    shutil.copytree(full_bundle, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["adaptation"]["factor_rank"] = 0  # says diagonal, but the state is (cov, mean)
    (copy / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as err:
        read_manifest(copy)
    assert "factor_rank 0 needs state ['precision', 'eta']" in str(err.value)
