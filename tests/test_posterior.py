"""Product-of-Gaussians belief: closed form, order invariance, online == batch, torch == numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.posterior import (
    entropy,
    prior_belief,
    product_of_gaussians,
    update_belief,
)
from training.posterior import kl_to_prior
from training.posterior import product_of_gaussians as torch_pog


def _factors(rng: np.random.Generator, n: int, z: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.normal(size=(n, z)), rng.uniform(0.05, 3.0, size=(n, z))


def test_product_of_gaussians_matches_closed_form_density_product() -> None:
    # Multiply the densities numerically on a 1-D grid and compare mean/var with the formula.
    rng = np.random.default_rng(0)
    mu, var = _factors(rng, 4, 1)
    grid = np.linspace(-8, 8, 200_001)
    log_p = -0.5 * grid**2  # N(0, 1) prior
    for m, v in zip(mu[:, 0], var[:, 0], strict=True):
        log_p += -0.5 * (grid - m) ** 2 / v
    p = np.exp(log_p - log_p.max())
    p /= p.sum()
    num_mean = float((grid * p).sum())
    num_var = float(((grid - num_mean) ** 2 * p).sum())
    mean, v = product_of_gaussians(mu, var)
    assert mean[0] == pytest.approx(num_mean, abs=1e-6)
    assert v[0] == pytest.approx(num_var, rel=1e-4)


def test_online_update_equals_batch_recompute() -> None:
    rng = np.random.default_rng(1)
    mu, var = _factors(rng, 50, 5)
    belief = prior_belief(1, 5)
    for i in range(50):
        belief = update_belief(belief, mu[i : i + 1], var[i : i + 1])
    mean, v = product_of_gaussians(mu, var)
    np.testing.assert_allclose(belief.mean[0], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(belief.var[0], v, rtol=1e-5)
    assert belief.count_B[0] == 50


@settings(max_examples=30, deadline=None)
@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=2, max_value=30))
def test_posterior_is_invariant_to_transition_order(seed: int, n: int) -> None:
    rng = np.random.default_rng(seed)
    mu, var = _factors(rng, n, 3)
    perm = rng.permutation(n)
    a, b = prior_belief(1, 3), prior_belief(1, 3)
    for i in range(n):
        a = update_belief(a, mu[i : i + 1], var[i : i + 1])
        b = update_belief(b, mu[perm[i] : perm[i] + 1], var[perm[i] : perm[i] + 1])
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.var, b.var, rtol=1e-5)


def test_torch_and_numpy_posteriors_agree() -> None:
    rng = np.random.default_rng(2)
    mu, var = _factors(rng, 16, 5)
    post = torch_pog(torch.from_numpy(mu)[None], torch.from_numpy(var)[None])
    mean, v = product_of_gaussians(mu, var)
    np.testing.assert_allclose(post.mean_BZ[0].numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(post.var_BZ[0].numpy(), v, rtol=1e-10)


def test_forgetting_discounts_old_evidence_toward_prior() -> None:
    old = np.full((1, 2), 3.0)
    new = np.full((1, 2), -3.0)
    var = np.full((1, 2), 0.1)
    keep, forget = prior_belief(1, 2), prior_belief(1, 2)
    for _ in range(30):
        keep = update_belief(keep, old, var)
        forget = update_belief(forget, old, var, forget=0.8)
    for _ in range(10):
        keep = update_belief(keep, new, var)
        forget = update_belief(forget, new, var, forget=0.8)
    # Without forgetting 10 new samples do not outweigh 30 old ones; with forgetting they dominate.
    assert keep.mean[0, 0] > 1.0
    assert forget.mean[0, 0] < -2.0
    # Precision stays bounded with forgetting: 1 + inv / (1 - lam) at most.
    assert np.all(forget.precision_BZ <= 1.0 + 10.0 / 0.2 + 1e-3)


def test_entropy_and_kl_of_the_prior() -> None:
    belief = prior_belief(2, 5)
    expected = 0.5 * 5 * np.log(2 * np.pi * np.e)
    np.testing.assert_allclose(entropy(belief), expected, rtol=1e-6)
    from training.posterior import Posterior

    kl = kl_to_prior(Posterior(torch.zeros(1, 5), torch.ones(1, 5)))
    assert float(kl) == pytest.approx(0.0, abs=1e-7)
