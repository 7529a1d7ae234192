"""Torch policies that follow :class:`runtime.evaluation.AdaptivePolicy`.

The belief is kept in natural parameters with the *same* numpy code the device runs
(:mod:`runtime.posterior`), updated after every transition.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.posterior import (
    Belief,
    FullBelief,
    initial_belief,
    update_belief,
    update_full_belief,
)
from runtime.tasks.base import FamilySpec
from runtime.transition import encode_transition
from training.agent import PearlNetworks, normalize_task


class PearlPolicy:
    """PEARL agent for a batch of tasks: online belief, actions from z.

    ``z_mode``: "mean" uses the posterior mean (deterministic deployment), "sample" draws z from
    the posterior once per episode (posterior sampling, used to collect training data).
    ``adaptive=False`` never updates the belief: the non-adaptive reference.
    """

    def __init__(
        self,
        nets: PearlNetworks,
        spec: FamilySpec,
        latent_dim: int,
        prior_var: float = 1.0,
        forget: float = 1.0,
        *,
        stochastic: bool = False,
        z_mode: str = "mean",
        adaptive: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.nets = nets
        self.spec = spec
        self.latent_dim = latent_dim
        self.prior_var = prior_var
        self.forget = forget
        self.stochastic = stochastic
        self.z_mode = z_mode
        self.adaptive = adaptive
        self.generator = generator
        self.full = nets.encoder is not None and nets.encoder.rank > 0
        self.belief: Belief | FullBelief = initial_belief(1, latent_dim, prior_var, self.full)
        self.z = np.zeros((1, latent_dim), dtype=np.float32)

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        self.belief = initial_belief(len(tasks_BK), self.latent_dim, self.prior_var, self.full)
        self.tasks = tasks_BK
        self.resample()

    def begin_episode(self) -> None:
        """The belief carries over episodes; only a posterior sample is redrawn per episode
        by the collection loop (:func:`training.collect.collect_episodes`)."""
        return None

    def resample(self) -> None:
        """Draw the z used until the next call (posterior sampling) or take the mean."""
        mean = self.belief.mean
        if self.z_mode == "sample":
            eps = torch.randn(mean.shape, generator=self.generator).numpy()
            if isinstance(self.belief, FullBelief):  # z = mean + L eps with cov = L L^T
                chol = np.linalg.cholesky(self.belief.cov_BZZ.astype(np.float64))
                noise = np.einsum("bzy,by->bz", chol, eps)
            else:
                noise = np.sqrt(self.belief.var) * eps
            self.z = (mean + noise).astype(np.float32)
        else:
            self.z = mean.astype(np.float32)

    @torch.no_grad()
    def act(self, obs_BO: np.ndarray) -> np.ndarray:
        obs = torch.from_numpy(np.asarray(obs_BO, dtype=np.float32))
        z = torch.from_numpy(self.z)
        if self.stochastic:
            return self.nets.actor(obs, z, self.generator).action.numpy()
        return self.nets.actor.deterministic(obs, z).numpy()

    @torch.no_grad()
    def observe(
        self,
        obs_BO: np.ndarray,
        action_BA: np.ndarray,
        reward_B: np.ndarray,
        next_obs_BO: np.ndarray,
        done_B: np.ndarray | bool = False,
    ) -> None:
        if not self.adaptive or self.nets.encoder is None:
            return
        x = torch.from_numpy(encode_transition(obs_BO, action_BA, reward_B, next_obs_BO))
        f = self.nets.encoder.factor(x)
        mu, var = f.mu.numpy(), None if f.var is None else f.var.numpy()
        if isinstance(self.belief, FullBelief):
            u = None if f.u is None else f.u.numpy()
            self.belief = update_full_belief(self.belief, mu, var, u, self.forget, self.prior_var)
        else:
            assert var is not None
            self.belief = update_belief(self.belief, mu, var, self.forget, self.prior_var)
        if self.z_mode == "mean":
            self.z = self.belief.mean.astype(np.float32)


class OraclePolicy(PearlPolicy):
    """Privileged oracle: the normalized true task vector replaces the latent."""

    def begin_task(self, tasks_BK: np.ndarray) -> None:
        self.tasks = tasks_BK
        self.z = normalize_task(tasks_BK, self.spec)

    def set_tasks(self, tasks_BK: np.ndarray) -> None:
        """The task changed mid-flight (a wind change): the oracle is told."""
        self.begin_task(tasks_BK)

    def resample(self) -> None:
        return None

    def observe(self, obs_BO, action_BA, reward_B, next_obs_BO, done_B=False) -> None:
        return None
