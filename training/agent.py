"""The PEARL agent's networks as one container, built from a config and a family spec."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from runtime.tasks.base import FamilySpec
from training.config import PearlConfig
from training.networks import ContextEncoder, TanhGaussianActor, TwinCritic


@dataclass
class PearlNetworks:
    """Encoder (absent for the oracle), actor, twin critic and its target copy."""

    encoder: ContextEncoder | None
    actor: TanhGaussianActor
    critic: TwinCritic
    critic_target: TwinCritic
    log_alpha: torch.Tensor

    def modules(self) -> dict[str, torch.nn.Module]:
        mods: dict[str, torch.nn.Module] = {
            "actor": self.actor,
            "critic": self.critic,
            "critic_target": self.critic_target,
        }
        if self.encoder is not None:
            mods["encoder"] = self.encoder
        return mods


def is_oracle(cfg: PearlConfig) -> bool:
    """The run is the privileged oracle (registry entry "oracle": PEARL's loop, true task)."""
    return cfg.algo == "oracle"


def policy_latent_dim(cfg: PearlConfig, spec: FamilySpec) -> int:
    """Width of what the actor sees besides obs: z, or the task vector for the oracle."""
    return spec.task_dim if is_oracle(cfg) else cfg.model.latent_dim


def build_networks(cfg: PearlConfig, spec: FamilySpec) -> PearlNetworks:
    """Fresh networks (initialized from torch's global RNG: seed it first)."""
    z = policy_latent_dim(cfg, spec)
    encoder = (
        None
        if is_oracle(cfg)
        else ContextEncoder(
            spec.obs_dim,
            spec.act_dim,
            cfg.model.latent_dim,
            cfg.model.encoder_hidden,
            cfg.model.min_var,
            cfg.model.factor_rank,
            cfg.model.factor_diagonal,
            cfg.model.factor_var == "shared",
        )
    )
    actor = TanhGaussianActor(spec.obs_dim, z, spec.act_dim, cfg.model.hidden)
    critic_hidden = cfg.model.critic_hidden or cfg.model.hidden
    norm = cfg.model.critic_layer_norm
    critic = TwinCritic(spec.obs_dim, spec.act_dim, z, critic_hidden, layer_norm=norm)
    target = TwinCritic(spec.obs_dim, spec.act_dim, z, critic_hidden, layer_norm=norm)
    target.load_state_dict(critic.state_dict())
    for p in target.parameters():
        p.requires_grad_(False)
    init = cfg.sac.init_alpha if cfg.sac.alpha == "auto" else float(cfg.sac.alpha)
    log_alpha = torch.tensor(float(np.log(init)), requires_grad=cfg.sac.alpha == "auto")
    return PearlNetworks(encoder, actor, critic, target, log_alpha)


def normalize_task(task_BK: np.ndarray, spec: FamilySpec) -> np.ndarray:
    """Map a task vector into [-1, 1] using the family's train-split range (oracle input)."""
    span = np.where(spec.task_high > spec.task_low, spec.task_high - spec.task_low, 1.0)
    return (2.0 * (task_BK - spec.task_low) / span - 1.0).astype(np.float32)


def scale_action(action_BA: np.ndarray, spec: FamilySpec) -> np.ndarray:
    """Map a policy action in [-1, 1] to the family's physical action bounds."""
    half = (spec.act_high - spec.act_low) / 2.0
    return (spec.act_low + half * (action_BA + 1.0)).astype(np.float32)
