"""Networks shared by training, export and tests.

State goes in and out: no module stores a latent or a posterior. Shapes use suffixes:
``B`` batch, ``T`` transitions in a context, ``Z`` latent, ``O`` obs, ``A`` action.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_LOG2 = math.log(2.0)


def mlp(
    in_dim: int, hidden: tuple[int, ...], out_dim: int, layer_norm: bool = False
) -> nn.Sequential:
    """ReLU multi-layer perceptron with a linear output layer (optionally LayerNorm'd)."""
    layers: list[nn.Module] = []
    last = in_dim
    for width in hidden:
        layers.append(nn.Linear(last, width))
        if layer_norm:
            layers.append(nn.LayerNorm(width))
        layers.append(nn.ReLU())
        last = width
    layers.append(nn.Linear(last, out_dim))
    return nn.Sequential(*layers)


def transition_dim(obs_dim: int, act_dim: int) -> int:
    """Width of one encoded transition (s, a, r, s')."""
    return 2 * obs_dim + act_dim + 1


class Factor(NamedTuple):
    """One transition's Gaussian factor over the latent.

    Its precision is ``diag(1 / var) + u @ u.T``: diagonal (PEARL) when ``u`` is None, else
    with ``rank`` extra directions of precision, the columns of ``u`` (..., Z, rank). Its
    mean is ``mu``, so its information vector is ``mu / var + u @ (u.T @ mu)``.
    """

    mu: torch.Tensor
    var: torch.Tensor | None  # None: no diagonal part (only the rank-one directions)
    u: torch.Tensor | None


class ContextEncoder(nn.Module):
    """Maps each transition (s, a, r, s') to a Gaussian factor over the latent.

    ``rank`` 0 gives PEARL's diagonal factors. ``rank`` r > 0 adds r rank-one precision
    directions per transition, so one transition can pin down a linear combination of latent
    coordinates (a goal seen from one side constrains ``p . g``: a line, not an axis); the
    posterior then has a full covariance. Each direction's precision is at most
    ``1 / min_var``, like the diagonal part's. ``shared_var``: the diagonal part is one learned
    variance per latent coordinate for every transition (the net emits only the means), so the
    posterior mean weighs every transition alike.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        latent_dim: int,
        hidden: tuple[int, ...],
        min_var: float,
        rank: int = 0,
        diag: bool = True,
        shared_var: bool = False,
    ) -> None:
        super().__init__()
        if not (rank or diag):
            raise ValueError("a factor needs a diagonal part or rank-one directions")
        self.latent_dim = latent_dim
        self.min_var = min_var
        self.rank = rank
        self.diag = diag
        self.u_max = 1.0 / math.sqrt(min_var)
        if shared_var and not diag:
            raise ValueError("a shared variance is the diagonal part's: it needs diag")
        self.shared_var = shared_var
        out = (1 + int(diag and not shared_var) + rank) * latent_dim
        self.net = mlp(transition_dim(obs_dim, act_dim), hidden, out)
        # One learned variance per latent coordinate, the same for every transition.
        self.var_param = nn.Parameter(torch.zeros(latent_dim)) if self.shared_var else None

    @property
    def per_transition_var(self) -> bool:
        """Whether the net emits the diagonal part's variance (columns z..2z of its output)."""
        return self.diag and not self.shared_var

    def variance(self, raw: torch.Tensor | None, mu: torch.Tensor) -> torch.Tensor | None:
        """The diagonal part's variance: shared, from the net's ``raw`` variance columns, or
        None without a diagonal part."""
        if self.shared_var:
            return (F.softplus(self.var_param) + self.min_var).expand_as(mu)
        return F.softplus(raw) + self.min_var if raw is not None else None

    def factor(self, transition_BD: torch.Tensor) -> Factor:
        out = self.net(transition_BD)
        z = self.latent_dim
        mu, rest = out[..., :z], out[..., z:]
        raw = None
        if self.per_transition_var:
            raw, rest = rest[..., :z], rest[..., z:]
        var = self.variance(raw, mu)
        if not self.rank:
            return Factor(mu, var, None)
        u = rest.unflatten(-1, (z, self.rank))
        return Factor(mu, var, self.u_max * torch.tanh(u / self.u_max))

    def forward(self, transition_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A diagonal factor's (mu, var). Use :meth:`factor` for factors with directions."""
        f = self.factor(transition_BD)
        assert f.var is not None and f.u is None
        return f.mu, f.var


class ActorOutput(NamedTuple):
    action: torch.Tensor  # tanh-squashed sample in [-1, 1]
    log_prob: torch.Tensor  # (B,)
    mean_action: torch.Tensor  # tanh(mean): the deterministic action


class TanhGaussianActor(nn.Module):
    """SAC actor on (obs, z): a Gaussian squashed by tanh into [-1, 1]^A."""

    def __init__(self, obs_dim: int, latent_dim: int, act_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim + latent_dim, hidden, 2 * act_dim)
        self.act_dim = act_dim

    def deterministic(self, obs_BO: torch.Tensor, z_BZ: torch.Tensor) -> torch.Tensor:
        """tanh(mean): the action a deployed policy takes, in [-1, 1]."""
        out = self.net(torch.cat([obs_BO, z_BZ], dim=-1))
        return torch.tanh(out[..., : self.act_dim])

    def forward(
        self, obs_BO: torch.Tensor, z_BZ: torch.Tensor, generator: torch.Generator | None = None
    ) -> ActorOutput:
        out = self.net(torch.cat([obs_BO, z_BZ], dim=-1))
        mean, log_std = out[..., : self.act_dim], out[..., self.act_dim :]
        log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        std = log_std.exp()
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        pre = mean + std * noise
        action = torch.tanh(pre)
        # log N(pre; mean, std) minus the tanh Jacobian, in a numerically stable form.
        gauss = -0.5 * noise.pow(2) - log_std - _HALF_LOG_2PI
        squash = 2.0 * (_LOG2 - pre - F.softplus(-2.0 * pre))
        log_prob = (gauss - squash).sum(-1)
        return ActorOutput(action, log_prob, torch.tanh(mean))


class TwinCritic(nn.Module):
    """Two Q-networks on (obs, action, z); returns both estimates."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        latent_dim: int,
        hidden: tuple[int, ...],
        layer_norm: bool = False,
    ):
        super().__init__()
        in_dim = obs_dim + act_dim + latent_dim
        self.q1 = mlp(in_dim, hidden, 1, layer_norm)
        self.q2 = mlp(in_dim, hidden, 1, layer_norm)

    def forward(
        self, obs_BO: torch.Tensor, act_BA: torch.Tensor, z_BZ: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs_BO, act_BA, z_BZ], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)
