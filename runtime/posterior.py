"""Product-of-Gaussians task belief in natural parameters (numpy, O(1) per transition).

Each transition i contributes a diagonal Gaussian factor N(mu_i, var_i) over the task latent z.
The posterior is the product of the factors and the N(0, prior_var I) prior:

    precision = 1/prior_var + sum_i 1/var_i
    eta       = sum_i mu_i / var_i          (prior mean is 0)
    mean      = eta / precision,  var = 1 / precision

A factor may also carry rank-one precision directions ``u_i`` (columns of a Z x R matrix, the
``model.factor_rank`` option): its precision is ``diag(1/var_i) + u_i u_i^T``. The belief then
keeps the full Z x Z precision matrix and ``mean = precision^-1 eta``; everything else is the
same, and an update is still O(1) in the context length (O(Z^2 R) work, a Z x Z solve for the
mean).

Keeping (precision, eta) as running sums makes an update O(1) in time and memory, whatever the
context length. A forgetting factor lam in (0, 1] discounts old evidence toward the prior so the
belief can track a task that changes (lam = 1: no forgetting).

The official PEARL code leaves the prior out of the product and uses it only in a KL term; we
multiply it in (as well as keeping the KL) so that the belief before any transition is the prior,
which is what a device needs at boot.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Belief(NamedTuple):
    """Natural parameters of a batch of Gaussian beliefs over the latent."""

    precision: np.ndarray  # (B, Z) diagonal 1/var, or (B, Z, Z) full precision matrix; float32
    eta_BZ: np.ndarray  # precision-weighted mean, float32
    count_B: np.ndarray  # transitions absorbed, int64

    @property
    def full(self) -> bool:
        return self.precision.ndim == 3

    @property
    def mean(self) -> np.ndarray:
        if self.full:
            return np.linalg.solve(self.precision, self.eta_BZ[..., None])[..., 0]
        return self.eta_BZ / self.precision

    @property
    def var(self) -> np.ndarray:
        """Marginal variance of each latent coordinate (the covariance's diagonal)."""
        if self.full:
            return np.diagonal(np.linalg.inv(self.precision), axis1=-2, axis2=-1).copy()
        return 1.0 / self.precision


def prior_belief(
    batch: int, latent_dim: int, prior_var: float = 1.0, full: bool = False
) -> Belief:
    """The belief before any evidence: N(0, prior_var I) for each of ``batch`` agents
    (``full``: kept as a precision matrix, for factors with rank-one directions)."""
    if full:
        eye = np.eye(latent_dim, dtype=np.float32) / np.float32(prior_var)
        precision = np.repeat(eye[None], batch, axis=0)
    else:
        precision = np.full((batch, latent_dim), 1.0 / prior_var, dtype=np.float32)
    return Belief(
        precision,
        np.zeros((batch, latent_dim), dtype=np.float32),
        np.zeros(batch, dtype=np.int64),
    )


def update_belief(
    belief: Belief,
    mu_BZ: np.ndarray,
    var_BZ: np.ndarray,
    forget: float = 1.0,
    prior_var: float = 1.0,
    u_BZR: np.ndarray | None = None,
) -> Belief:
    """Absorb one factor per agent (precision ``diag(1/var) + u u^T``, mean ``mu``);
    ``forget`` < 1 discounts older evidence toward the prior."""
    prior_prec = np.float32(1.0 / prior_var)
    lam = np.float32(forget)
    inv = 1.0 / var_BZ
    eta = lam * belief.eta_BZ + mu_BZ * inv
    if not belief.full:
        if u_BZR is not None:
            raise ValueError("a factor with rank-one directions needs a full belief")
        precision = prior_prec + lam * (belief.precision - prior_prec) + inv
        return Belief(precision.astype(np.float32), eta.astype(np.float32), belief.count_B + 1)
    eye = np.eye(belief.precision.shape[-1], dtype=np.float32)
    precision = prior_prec * eye + lam * (belief.precision - prior_prec * eye)
    precision = precision + inv[..., None] * eye
    if u_BZR is not None:
        precision = precision + u_BZR @ np.swapaxes(u_BZR, -1, -2)
        eta = eta + (u_BZR @ (np.swapaxes(u_BZR, -1, -2) @ mu_BZ[..., None]))[..., 0]
    return Belief(precision.astype(np.float32), eta.astype(np.float32), belief.count_B + 1)


def product_of_gaussians(
    mu_NZ: np.ndarray, var_NZ: np.ndarray, prior_var: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form posterior (mean, var) of N factors and the prior, recomputed from scratch."""
    precision = 1.0 / prior_var + np.sum(1.0 / var_NZ, axis=0)
    mean = np.sum(mu_NZ / var_NZ, axis=0) / precision
    return mean, 1.0 / precision


def entropy(belief: Belief) -> np.ndarray:
    """Differential entropy (nats) of each Gaussian belief, shape (B,)."""
    z = belief.eta_BZ.shape[-1]
    if belief.full:
        log_det = np.linalg.slogdet(belief.precision)[1]
    else:
        log_det = np.sum(np.log(belief.precision), axis=-1)
    return 0.5 * (z * np.log(2 * np.pi * np.e) - log_det)
