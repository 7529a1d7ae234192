"""Product-of-Gaussians task belief in natural parameters (numpy, O(1) per transition).

Each transition i contributes a diagonal Gaussian factor N(mu_i, var_i) over the task latent z.
The posterior is the product of the factors and the N(0, prior_var I) prior:

    precision = 1/prior_var + sum_i 1/var_i
    eta       = sum_i mu_i / var_i          (prior mean is 0)
    mean      = eta / precision,  var = 1 / precision

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


def entropy(belief: Belief) -> np.ndarray:
    """Differential entropy (nats) of each diagonal Gaussian belief, shape (B,)."""
    z = belief.precision_BZ.shape[-1]
    return 0.5 * (z * np.log(2 * np.pi * np.e) - np.sum(np.log(belief.precision_BZ), axis=-1))
