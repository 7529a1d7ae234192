"""Product-of-Gaussians posterior over the task latent (torch, differentiable).

Mirrors :mod:`runtime.posterior` (numpy) exactly: the N(0, prior_var I) prior is multiplied in.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Posterior(NamedTuple):
    mean_BZ: torch.Tensor
    var_BZ: torch.Tensor


def product_of_gaussians(
    mu_BTZ: torch.Tensor, var_BTZ: torch.Tensor, prior_var: float = 1.0
) -> Posterior:
    """Posterior of T factors per batch row times the prior: precisions add."""
    precision = 1.0 / prior_var + (1.0 / var_BTZ).sum(dim=1)
    eta = (mu_BTZ / var_BTZ).sum(dim=1)
    return Posterior(eta / precision, 1.0 / precision)


def kl_to_prior(post: Posterior, prior_var: float = 1.0) -> torch.Tensor:
    """KL(N(mean, var) || N(0, prior_var I)) per batch row, in nats."""
    ratio = post.var_BZ / prior_var
    return 0.5 * (ratio + post.mean_BZ.pow(2) / prior_var - 1.0 - torch.log(ratio)).sum(-1)


def sample(post: Posterior, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterized sample z = mean + std * eps."""
    eps = torch.randn(post.mean_BZ.shape, generator=generator, dtype=post.mean_BZ.dtype)
    return post.mean_BZ + post.var_BZ.sqrt() * eps
