"""``model.factor_var: shared``: one learned variance per latent coordinate for every transition.

The belief mean is then a (forgetting-weighted) average of the factor means whose weights do not
depend on the transitions; the encoder, the exported graphs, the torch rebuild and the runtime
agree on it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bundle_fixtures import SMALL, cached_bundle, cached_run

from export.reference import dims_of, random_step_inputs, torch_step
from export.torch_reference import step_module_from_bundle
from export.verify import verify
from runtime.agent import Agent, AgentConfig
from runtime.bundle import read_manifest
from runtime.providers import CPU
from runtime.session import GraphSession
from training.checkpoint import load_run
from training.networks import ContextEncoder

SHARED = (*SMALL, "model.factor_var=shared")
SHARED_FULL = (*SHARED, "model.factor_rank=1")


def test_every_transition_gets_the_learned_variance_and_it_trains():
    torch.manual_seed(0)
    enc = ContextEncoder(4, 2, 3, (16,), min_var=1e-4, shared_var=True)
    assert enc.net[-1].out_features == 3  # the means only
    x = torch.randn(7, 4 + 2 + 1 + 4)
    f = enc.factor(x)
    assert f.var.shape == (7, 3)
    want = torch.nn.functional.softplus(enc.var_param) + 1e-4
    torch.testing.assert_close(f.var, want.expand(7, 3))
    (f.mu.sum() + f.var.sum()).backward()
    assert enc.var_param.grad is not None and torch.all(enc.var_param.grad != 0)


def test_a_shared_variance_needs_a_diagonal_part():
    with pytest.raises(ValueError, match="needs diag"):
        ContextEncoder(4, 2, 3, (16,), 1e-4, rank=1, diag=False, shared_var=True)


@pytest.mark.parametrize("overrides", [SHARED, SHARED_FULL], ids=["diagonal", "full"])
def test_shared_bundle_verifies_declares_and_matches_its_torch_rebuild(tmp_path_factory, overrides):
    run_dir = cached_run(tmp_path_factory, overrides)
    bundle = cached_bundle(tmp_path_factory, overrides)
    manifest = read_manifest(bundle)
    assert manifest.adaptation.factor_var == "shared"
    res = verify(bundle, run_dir=run_dir)
    assert res.ok, res.reasons
    run = load_run(run_dir)
    dims = dims_of(run)
    inputs = random_step_inputs(dims, run.family.spec, 16, np.random.default_rng(3), 1.0, 0.0)
    rebuilt = torch_step(step_module_from_bundle(bundle), inputs, dims)
    spec = manifest.graph("step")
    got = GraphSession(bundle / spec.file, spec, providers=[CPU]).run_feeds(inputs)
    for name in ("action", "surprise"):
        np.testing.assert_allclose(got[name], rebuilt[name], rtol=1e-4, atol=1e-5)
    enc = manifest.graph("encoder")
    out = GraphSession(bundle / enc.file, enc, providers=[CPU]).run_feeds(
        {"transition": inputs["transition"]}
    )
    np.testing.assert_array_equal(out["var"], np.broadcast_to(out["var"][:1], out["var"].shape))


def test_the_belief_weights_every_transition_alike(tmp_path_factory):
    """Agents fed different transitions hold the same precision: it counts the (forgotten)
    evidence and does not depend on it, so each factor mean weighs the same in the belief
    mean. With per-transition variances the precision differs from agent to agent."""
    bundle = cached_bundle(tmp_path_factory, SHARED)
    per_transition = cached_bundle(tmp_path_factory, SMALL)
    m = read_manifest(bundle)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(4, m.obs.dim)).astype(np.float32)
    steps = [rng.normal(size=(4, m.obs.dim)).astype(np.float32) for _ in range(12)]
    precisions = {}
    for name, path in (("shared", bundle), ("per_transition", per_transition)):
        agent = Agent.load(path, config=AgentConfig(params={"forget": 0.9}))
        agent.reset(4)
        o = obs
        for nxt in steps:
            agent.observe(o, agent.act(o), np.zeros(4, np.float32), nxt)
            o = nxt
        precisions[name] = agent.state["precision"]
    shared = precisions["shared"]
    np.testing.assert_allclose(shared, np.broadcast_to(shared[:1], shared.shape), rtol=1e-6)
    spread = precisions["per_transition"].std(axis=0) / precisions["per_transition"].mean(axis=0)
    assert np.all(spread > 1e-3)
