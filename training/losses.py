"""PEARL losses: SAC critic (+ encoder through z), actor, temperature, KL.

Gradient routing (the PEARL rule): the encoder is trained by the critic's Bellman loss and the
KL only. The actor and the temperature see ``z.detach()``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from training.agent import PearlNetworks
from training.posterior import Posterior, full_product_of_gaussians, kl_to_prior, sample


@dataclass
class CriticLosses:
    """Bellman loss of both critics (+ KL, which also trains the encoder)."""

    loss_critic: torch.Tensor  # includes kl_weight * loss_kl
    loss_kl: torch.Tensor
    q_mean: torch.Tensor
    z_det: torch.Tensor  # the z used, detached, for the actor update


@dataclass
class ActorLosses:
    loss_actor: torch.Tensor
    loss_alpha: torch.Tensor
    entropy: torch.Tensor


@dataclass
class TorchBatch:
    """One meta-batch: M tasks, B transitions each (flattened to M*B), C context transitions."""

    obs: torch.Tensor  # (M*B, O)
    action: torch.Tensor  # (M*B, A)
    reward: torch.Tensor  # (M*B,)
    next_obs: torch.Tensor  # (M*B, O)
    done: torch.Tensor  # (M*B,)
    context: torch.Tensor | None  # (M, C, D) encoded transitions
    context_weight: torch.Tensor | None  # (M, C) weight of each transition's factor, 0 = unused
    task_z: torch.Tensor | None  # (M, K) normalized task vectors (oracle)
    per_task: int  # B


def infer_posterior(
    nets: PearlNetworks, context_MCD: torch.Tensor, weight_MC: torch.Tensor, prior_var: float
) -> Posterior:
    """Product of the per-transition factors (each raised to its weight) and the prior.

    Weight 1 is a plain factor; a masked-out transition (weight 0) contributes zero precision
    (var -> inf); weight w stands for w transitions like it (subsampled long contexts).
    """
    assert nets.encoder is not None
    mu, var, u = nets.encoder.factor(context_MCD)
    if u is not None:
        return full_product_of_gaussians(mu, var, u, weight_MC, prior_var)
    inv = weight_MC.unsqueeze(-1) / var
    precision = 1.0 / prior_var + inv.sum(dim=1)
    eta = (mu * inv).sum(dim=1)
    return Posterior(eta / precision, 1.0 / precision)


def task_latents(
    nets: PearlNetworks, batch: TorchBatch, prior_var: float, gen: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-transition z (M*B, Z) with gradient to the encoder, and the mean KL."""
    if batch.task_z is not None:
        z_M = batch.task_z
        kl = torch.zeros(())
    else:
        assert batch.context is not None and batch.context_weight is not None
        post = infer_posterior(nets, batch.context, batch.context_weight, prior_var)
        z_M = sample(post, gen)
        kl = kl_to_prior(post, prior_var).mean()
    return z_M.repeat_interleave(batch.per_task, dim=0), kl


def critic_losses(
    nets: PearlNetworks,
    batch: TorchBatch,
    *,
    gamma: float,
    reward_scale: float,
    kl_weight: float,
    prior_var: float,
    generator: torch.Generator | None = None,
) -> CriticLosses:
    """Twin-critic Bellman loss; z keeps its gradient, so this loss trains the encoder."""
    z, kl = task_latents(nets, batch, prior_var, generator)
    z_det = z.detach()
    alpha = nets.log_alpha.exp().detach()
    with torch.no_grad():
        nxt = nets.actor(batch.next_obs, z_det, generator)
        tq1, tq2 = nets.critic_target(batch.next_obs, nxt.action, z_det)
        target_v = torch.min(tq1, tq2) - alpha * nxt.log_prob
        y = reward_scale * batch.reward + gamma * (1.0 - batch.done) * target_v
    q1, q2 = nets.critic(batch.obs, batch.action, z)
    loss = F.mse_loss(q1, y) + F.mse_loss(q2, y) + kl_weight * kl
    return CriticLosses(loss, kl.detach(), q1.detach().mean(), z_det)


def actor_losses(
    nets: PearlNetworks,
    obs: torch.Tensor,
    z_det: torch.Tensor,
    *,
    target_entropy: float,
    generator: torch.Generator | None = None,
) -> ActorLosses:
    """SAC actor and temperature losses on a detached z: no gradient reaches the encoder."""
    alpha = nets.log_alpha.exp().detach()
    pi = nets.actor(obs, z_det, generator)
    q1, q2 = nets.critic(obs, pi.action, z_det)
    loss_actor = (alpha * pi.log_prob - torch.min(q1, q2)).mean()
    loss_alpha = -(nets.log_alpha * (pi.log_prob.detach() + target_entropy)).mean()
    return ActorLosses(loss_actor, loss_alpha, -pi.log_prob.detach().mean())


def soft_update(target: torch.nn.Module, source: torch.nn.Module, tau: float) -> None:
    """Polyak averaging: target <- (1 - tau) target + tau source."""
    with torch.no_grad():
        for t, s in zip(target.parameters(), source.parameters(), strict=True):
            t.mul_(1.0 - tau).add_(s, alpha=tau)
