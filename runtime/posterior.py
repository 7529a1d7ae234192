"""Product-of-Gaussians task belief in natural parameters (numpy, O(1) per transition).

Each transition i contributes a diagonal Gaussian factor N(mu_i, var_i) over the task latent z.
The posterior is the product of the factors and the N(0, prior_var I) prior:

    precision = 1/prior_var + sum_i 1/var_i
    eta       = sum_i mu_i / var_i          (prior mean is 0)
    mean      = eta / precision,  var = 1 / precision

Keeping (precision, eta) as running sums makes an update O(1) in time and memory, whatever the
context length. A forgetting factor lam in (0, 1] discounts old evidence toward the prior so the
belief can track a task that changes (lam = 1: no forgetting).

**Full beliefs.** With ``model.factor_rank`` R > 0 a factor also carries R rank-one precision
directions ``u_ir`` (its precision is ``diag(1/var_i) + sum_r u_ir u_ir^T``; the diagonal part
is optional): one transition can then pin down a linear combination of latent coordinates.
The belief becomes a full Gaussian, kept as (covariance, mean) and updated like a Kalman filter:
the factor is Z + R (or R) scalar measurements, ``mu_ik = e_k . z`` with noise ``var_ik`` and
``u_ir . mu_i = u_ir . z`` with unit noise, absorbed one after another by rank-one updates.
That is the exact product of Gaussians (in any order), needs no matrix inverse, and stays O(1)
per transition (O(Z^2 (Z + R)) work). Forgetting inflates the covariance toward the prior's,
``cov <- lam cov + (1 - lam) prior_var I``, and keeps the mean. The bundle's step graph reaches
the same posterior in closed form with one Z x Z inverse (fewer, larger graph nodes; see
:class:`export.graphs.FullStepGraph`); this sequential form is what training's data collection
uses and what the graph is tested against.

The official PEARL code leaves the prior out of the product and uses it only in a KL term; we
multiply it in (as well as keeping the KL) so that the belief before any transition is the prior,
which is what a device needs at boot.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


def belief_io(full: bool) -> tuple[tuple[str, str], tuple[str, str]]:
    """Names of the belief's two arrays as step-graph inputs and outputs: natural parameters
    (precision, eta) for a diagonal belief, (cov, mean) for a full one."""
    if full:
        return ("cov", "mean"), ("cov_out", "mean_out")
    return ("precision", "eta"), ("precision_out", "eta_out")


class Belief(NamedTuple):
    """Natural parameters of a batch of diagonal Gaussian beliefs over the latent."""

    precision_BZ: np.ndarray  # 1/var, float32
    eta_BZ: np.ndarray  # precision-weighted mean, float32
    count_B: np.ndarray  # transitions absorbed, int64

    @property
    def mean(self) -> np.ndarray:
        return self.eta_BZ / self.precision_BZ

    @property
    def var(self) -> np.ndarray:
        return 1.0 / self.precision_BZ


def prior_belief(batch: int, latent_dim: int, prior_var: float = 1.0) -> Belief:
    """The belief before any evidence: N(0, prior_var I) for each of ``batch`` agents."""
    return Belief(
        np.full((batch, latent_dim), 1.0 / prior_var, dtype=np.float32),
        np.zeros((batch, latent_dim), dtype=np.float32),
        np.zeros(batch, dtype=np.int64),
    )


def update_belief(
    belief: Belief,
    mu_BZ: np.ndarray,
    var_BZ: np.ndarray,
    forget: float = 1.0,
    prior_var: float = 1.0,
) -> Belief:
    """Absorb one factor N(mu, var) per agent; ``forget`` < 1 discounts older evidence."""
    prior_prec = np.float32(1.0 / prior_var)
    lam = np.float32(forget)
    inv = 1.0 / var_BZ
    precision = prior_prec + lam * (belief.precision_BZ - prior_prec) + inv
    eta = lam * belief.eta_BZ + mu_BZ * inv
    return Belief(precision.astype(np.float32), eta.astype(np.float32), belief.count_B + 1)


def product_of_gaussians(
    mu_NZ: np.ndarray, var_NZ: np.ndarray, prior_var: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form posterior (mean, var) of N factors and the prior, recomputed from scratch."""
    precision = 1.0 / prior_var + np.sum(1.0 / var_NZ, axis=0)
    mean = np.sum(mu_NZ / var_NZ, axis=0) / precision
    return mean, 1.0 / precision


class FullBelief(NamedTuple):
    """A batch of full-covariance Gaussian beliefs (factors with rank-one directions)."""

    cov_BZZ: np.ndarray  # covariance, float32
    mean_BZ: np.ndarray  # float32
    count_B: np.ndarray  # transitions absorbed, int64

    @property
    def mean(self) -> np.ndarray:
        return self.mean_BZ

    @property
    def var(self) -> np.ndarray:
        """Marginal variance of each latent coordinate (the covariance's diagonal)."""
        return np.diagonal(self.cov_BZZ, axis1=-2, axis2=-1).copy()


def prior_full_belief(batch: int, latent_dim: int, prior_var: float = 1.0) -> FullBelief:
    """The prior N(0, prior_var I) as a full belief for each of ``batch`` agents."""
    eye = np.eye(latent_dim, dtype=np.float32) * np.float32(prior_var)
    return FullBelief(
        np.repeat(eye[None], batch, axis=0),
        np.zeros((batch, latent_dim), dtype=np.float32),
        np.zeros(batch, dtype=np.int64),
    )


def initial_belief(
    batch: int, latent_dim: int, prior_var: float = 1.0, full: bool = False
) -> Belief | FullBelief:
    """The prior as the belief kind a bundle or encoder uses (``full``: rank-one directions)."""
    if full:
        return prior_full_belief(batch, latent_dim, prior_var)
    return prior_belief(batch, latent_dim, prior_var)


def factor_measurements(
    mu_BZ: np.ndarray, var_BZ: np.ndarray | None, u_BZR: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """A factor as scalar measurements ``h . mu = h . z + N(0, noise)``: rows ``h_BMZ`` and
    noise variances ``noise_BM`` (diagonal part first, then the directions)."""
    b, z = mu_BZ.shape
    hs, noises = [], []
    if var_BZ is not None:
        hs.append(np.broadcast_to(np.eye(z, dtype=np.float32), (b, z, z)))
        noises.append(var_BZ)
    if u_BZR is not None:
        hs.append(np.swapaxes(u_BZR, -1, -2))
        noises.append(np.ones(u_BZR.shape[::2], dtype=np.float32))
    return np.concatenate(hs, 1), np.concatenate(noises, 1)


def update_full_belief(
    belief: FullBelief,
    mu_BZ: np.ndarray,
    var_BZ: np.ndarray | None,
    u_BZR: np.ndarray | None,
    forget: float = 1.0,
    prior_var: float = 1.0,
) -> FullBelief:
    """Absorb one factor per agent by sequential rank-one (Kalman) updates; see module doc."""
    z = belief.mean_BZ.shape[-1]
    lam = np.float32(forget)
    cov = lam * belief.cov_BZZ + (1 - lam) * np.float32(prior_var) * np.eye(z, dtype=np.float32)
    mean = belief.mean_BZ.copy()
    h_BMZ, noise_BM = factor_measurements(mu_BZ, var_BZ, u_BZR)
    for m in range(h_BMZ.shape[1]):
        h = h_BMZ[:, m]
        ch = np.einsum("bzy,by->bz", cov, h)
        gain = ch / (np.einsum("bz,bz->b", h, ch) + noise_BM[:, m])[:, None]
        mean = mean + gain * np.einsum("bz,bz->b", h, mu_BZ - mean)[:, None]
        cov = cov - gain[:, :, None] * ch[:, None, :]
    cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
    return FullBelief(cov.astype(np.float32), mean.astype(np.float32), belief.count_B + 1)


def full_surprise(
    belief: FullBelief, mu_BZ: np.ndarray, var_BZ: np.ndarray | None, u_BZR: np.ndarray | None
) -> np.ndarray:
    """Mean normalized innovation ``(h . (mu - m))^2 / (h^T cov h + noise)`` of a factor's
    measurements under the belief before it: the full belief's OOD score, shape (B,)."""
    h_BMZ, noise_BM = factor_measurements(mu_BZ, var_BZ, u_BZR)
    innovation = np.einsum("bmz,bz->bm", h_BMZ, mu_BZ - belief.mean_BZ)
    spread = np.einsum("bmz,bzy,bmy->bm", h_BMZ, belief.cov_BZZ, h_BMZ) + noise_BM
    return (innovation**2 / spread).mean(axis=-1)


def full_product_of_gaussians(
    mu_NZ: np.ndarray, var_NZ: np.ndarray | None, u_NZR: np.ndarray | None, prior_var: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form (mean, cov) of N factors with rank-one directions and the prior, from
    scratch: precision matrices and information vectors add, then one solve."""
    z = mu_NZ.shape[1]
    precision = np.eye(z) / prior_var
    eta = np.zeros(z)
    if var_NZ is not None:
        precision = precision + np.diag(np.sum(1.0 / var_NZ, axis=0))
        eta = eta + np.sum(mu_NZ / var_NZ, axis=0)
    if u_NZR is not None:
        precision = precision + np.einsum("nzr,nyr->zy", u_NZR, u_NZR)
        eta = eta + np.einsum("nzr,nyr,ny->z", u_NZR, u_NZR, mu_NZ)
    cov = np.linalg.inv(precision)
    return cov @ eta, cov


def entropy(belief: Belief | FullBelief) -> np.ndarray:
    """Differential entropy (nats) of each Gaussian belief, shape (B,)."""
    if isinstance(belief, FullBelief):
        z = belief.mean_BZ.shape[-1]
        log_det_cov = np.linalg.slogdet(belief.cov_BZZ.astype(np.float64))[1]
        return 0.5 * (z * np.log(2 * np.pi * np.e) + log_det_cov)
    z = belief.precision_BZ.shape[-1]
    return 0.5 * (z * np.log(2 * np.pi * np.e) - np.sum(np.log(belief.precision_BZ), axis=-1))
