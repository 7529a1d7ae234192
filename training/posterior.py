"""Product-of-Gaussians posterior over the task latent (torch, differentiable).

Mirrors :mod:`runtime.posterior` (numpy) exactly: the N(0, prior_var I) prior is multiplied in.
Diagonal factors give a diagonal posterior (``prec_chol_BZZ`` None); factors with rank-one
precision directions give a full one, kept as the Cholesky factor of its precision matrix.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Posterior(NamedTuple):
    mean_BZ: torch.Tensor
    var_BZ: torch.Tensor  # marginal variances (the diagonal of the covariance)
    prec_chol_BZZ: torch.Tensor | None = None  # lower Cholesky factor of the precision matrix


def product_of_gaussians(
    mu_BTZ: torch.Tensor, var_BTZ: torch.Tensor, prior_var: float = 1.0
) -> Posterior:
    """Posterior of T factors per batch row times the prior: precisions add."""
    precision = 1.0 / prior_var + (1.0 / var_BTZ).sum(dim=1)
    eta = (mu_BTZ / var_BTZ).sum(dim=1)
    return Posterior(eta / precision, 1.0 / precision)


def full_product_of_gaussians(
    mu_BTZ: torch.Tensor,
    var_BTZ: torch.Tensor | None,
    u_BTZR: torch.Tensor,
    weight_BT: torch.Tensor,
    prior_var: float = 1.0,
) -> Posterior:
    """Posterior of T factors with precision ``diag(1/var) + u u^T`` (no diagonal part when
    ``var`` is None; each factor raised to its weight) times the prior: precision matrices
    and information vectors add."""
    w = weight_BT.unsqueeze(-1)
    uw = u_BTZR * w.unsqueeze(-1).sqrt()
    proj = torch.einsum("btzr,btz->btr", u_BTZR, mu_BTZ)
    info = torch.einsum("btzr,btr->btz", u_BTZR, proj)
    diag = torch.full_like(mu_BTZ[:, 0], 1.0 / prior_var)
    if var_BTZ is not None:
        diag = diag + (w / var_BTZ).sum(dim=1)
        info = info + mu_BTZ / var_BTZ
    precision = torch.diag_embed(diag) + torch.einsum("btzr,btyr->bzy", uw, uw)
    eta = (w * info).sum(dim=1)
    chol = torch.linalg.cholesky(precision)
    mean = torch.cholesky_solve(eta.unsqueeze(-1), chol).squeeze(-1)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype).expand_as(chol)
    inv_chol = torch.linalg.solve_triangular(chol, eye, upper=False)  # L^-1
    var = inv_chol.pow(2).sum(dim=-2)  # diag(L^-T L^-1)
    return Posterior(mean, var, chol)


def kl_to_prior(post: Posterior, prior_var: float = 1.0) -> torch.Tensor:
    """KL(N(mean, cov) || N(0, prior_var I)) per batch row, in nats."""
    if post.prec_chol_BZZ is None:
        ratio = post.var_BZ / prior_var
        return 0.5 * (ratio + post.mean_BZ.pow(2) / prior_var - 1.0 - torch.log(ratio)).sum(-1)
    z = post.mean_BZ.shape[-1]
    log_det_prec = 2.0 * torch.log(torch.diagonal(post.prec_chol_BZZ, dim1=-2, dim2=-1)).sum(-1)
    trace = post.var_BZ.sum(-1)
    quad = post.mean_BZ.pow(2).sum(-1)
    return 0.5 * ((trace + quad) / prior_var - z + z * math.log(prior_var) + log_det_prec)


def sample(post: Posterior, generator: torch.Generator | None = None) -> torch.Tensor:
    """Reparameterized sample: z = mean + std * eps, or mean + L^-T eps for a full posterior."""
    eps = torch.randn(post.mean_BZ.shape, generator=generator, dtype=post.mean_BZ.dtype)
    if post.prec_chol_BZZ is None:
        return post.mean_BZ + post.var_BZ.sqrt() * eps
    lt = post.prec_chol_BZZ.transpose(-2, -1)
    return post.mean_BZ + torch.linalg.solve_triangular(lt, eps.unsqueeze(-1), upper=True).squeeze(
        -1
    )
