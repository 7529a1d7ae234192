"""RL² networks (Duan et al., 2016): a recurrent actor-critic whose hidden state is the adaptation.

The recurrence consumes *transitions*: ``h_t = GRU(h_{t-1}, embed(transition_t, done_t))`` with
``transition = concat(obs, action_norm, reward, next_obs)`` (:mod:`runtime.transition`) and
``done`` = 1 when ``next_obs`` is the last observation of an episode. This is RL² with the
previous (obs, action, reward, done) fed to the recurrence, arranged so that absorbing evidence
and acting are separate calls (the device contract: a step graph absorbs, an act graph acts).
The policy is ``pi(a | obs_t, h_t)``: it acts on the current observation under the state that
has absorbed every earlier transition of the trial. ``h`` is kept across the K episodes of a
trial (same task) and starts at zeros for every new task.

Distribution: a Gaussian over the *pre-tanh* action ``u`` with a state-independent log-std
(cleanrl's PPO), the action is ``tanh(u)``. PPO's ratio is taken on ``u``: the tanh Jacobian
does not depend on the parameters and cancels, so the ratio is exact, and the deterministic
action ``tanh(mean)`` is what the device runs. (A clipped Gaussian would put probability mass
on the bounds that its log-density ignores.)

Surprise: an auxiliary head predicts the reward and the change of observation of transition t
from (h_{t-1}, obs_t, action_t), i.e. *before* absorbing it. Surprise is its squared error per
dimension divided by the mean squared error seen in training (``err_scale``, floored), averaged
over dimensions and divided by that average's own training mean (``surprise_scale``), so its
mean over training-like transitions is about 1 (dimensions predicted exactly contribute about
0 before that last division) and it is large where the agent's model of the task is wrong.
Both scales are buffers kept as running averages over fresh rollouts during training, so they
are saved and exported with the module.

State goes in and out (no hidden state is stored on a module). Shape suffixes: ``B`` batch,
``H`` hidden, ``O`` obs, ``A`` action, ``D`` transition width.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from training.networks import mlp

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
LOG_STD_MIN = -5.0
LOG_STD_MAX = 1.0
# Normalized squared error (10 % of a std, squared) below which a dimension counts as exactly
# predicted: smaller errors are float32 rounding of a near-perfect prediction, and dividing by
# them would turn rounding into surprise (point-nav's position change is exact).
ERR_SCALE_FLOOR = 1e-2


class GRUCell(nn.Module):
    """A GRU cell with exactly :class:`torch.nn.GRUCell`'s math, built from two Linear layers.

    ``r, z, n`` gates in that order (torch's layout: ``ih.weight`` is ``weight_ih`` and
    ``hh.weight`` is ``weight_hh``)::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
        z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
        h' = (1 - z) * n + z * h

    Written out so that ONNX export gives plain MatMul/Sigmoid/Tanh nodes instead of the ONNX
    GRU op (whose export has had a ``linear_before_reset`` bug, REFERENCE.md).
    """

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = nn.Linear(input_size, 3 * hidden_size)
        self.hh = nn.Linear(hidden_size, 3 * hidden_size)
        bound = 1.0 / math.sqrt(hidden_size)  # torch.nn.GRUCell's initialization
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x_BI: torch.Tensor, h_BH: torch.Tensor) -> torch.Tensor:
        gi = self.ih(x_BI)
        gh = self.hh(h_BH)
        n_h = self.hidden_size
        r = torch.sigmoid(gi[:, :n_h] + gh[:, :n_h])
        z = torch.sigmoid(gi[:, n_h : 2 * n_h] + gh[:, n_h : 2 * n_h])
        n = torch.tanh(gi[:, 2 * n_h :] + r * gh[:, 2 * n_h :])
        return (1.0 - z) * n + z * h_BH

    def load_from_torch(self, cell: nn.GRUCell) -> None:
        """Copy the weights of a :class:`torch.nn.GRUCell` (same layout)."""
        with torch.no_grad():
            self.ih.weight.copy_(cell.weight_ih)
            self.ih.bias.copy_(cell.bias_ih)
            self.hh.weight.copy_(cell.weight_hh)
            self.hh.bias.copy_(cell.bias_hh)


class PolicyDist(NamedTuple):
    """Gaussian over the pre-tanh action ``u``; the action is ``tanh(u)``."""

    mean: torch.Tensor  # (B, A)
    log_std: torch.Tensor  # (A,) or (B, A)

    def log_prob(self, u_BA: torch.Tensor) -> torch.Tensor:
        """log N(u; mean, std) summed over action dimensions, (B,)."""
        z = (u_BA - self.mean) * torch.exp(-self.log_std)
        return (-0.5 * z.pow(2) - self.log_std - _HALF_LOG_2PI).sum(-1)

    def entropy(self) -> torch.Tensor:
        """Entropy of the pre-tanh Gaussian (nats), (B,)."""
        ent = self.log_std + 0.5 + _HALF_LOG_2PI
        return ent.expand_as(self.mean).sum(-1)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype)
        return self.mean + torch.exp(self.log_std) * noise


class RL2Agent(nn.Module):
    """Recurrent actor-critic with an auxiliary reward/dynamics head (see the module docstring).

    Inputs are standardized with fixed statistics (buffers, set once from random-action
    rollouts by :meth:`set_normalizers`, exported with the module): obs, reward and the change
    of observation. Normalized actions are already in [-1, 1].
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: int,
        embed: tuple[int, ...],
        head_hidden: tuple[int, ...],
        init_log_std: float = -0.5,
    ) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.hidden_size = hidden
        trans = 2 * obs_dim + act_dim + 1
        self.embed = mlp(trans + 1, embed[:-1], embed[-1])
        self.embed_act = nn.Tanh()
        self.gru = GRUCell(embed[-1], hidden)
        self.actor = mlp(obs_dim + hidden, head_hidden, act_dim)
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))
        # The critic also sees the fraction of the trial elapsed: returns-to-go depend on it and
        # the critic is training-only (never exported), so the device need not know the clock.
        self.critic = mlp(obs_dim + hidden + 1, head_hidden, 1)
        self.aux = mlp(hidden + obs_dim + act_dim, head_hidden, 1 + obs_dim)
        with torch.no_grad():  # small initial actions (cleanrl's 0.01-gain policy output layer)
            self.actor[-1].weight.mul_(0.01)
            self.actor[-1].bias.zero_()
        self.register_buffer("obs_mean", torch.zeros(obs_dim))
        self.register_buffer("obs_std", torch.ones(obs_dim))
        self.register_buffer("rew_mean", torch.zeros(1))
        self.register_buffer("rew_std", torch.ones(1))
        self.register_buffer("delta_std", torch.ones(obs_dim))
        self.register_buffer("err_scale", torch.ones(1 + obs_dim))
        self.register_buffer("surprise_scale", torch.ones(1))

    # -- normalization --------------------------------------------------------------------
    def set_normalizers(
        self, obs_NO: torch.Tensor, reward_N: torch.Tensor, next_obs_NO: torch.Tensor
    ) -> None:
        """Fix the input statistics from a sample of transitions (std floored at 1e-3)."""
        with torch.no_grad():
            self.obs_mean.copy_(obs_NO.mean(0))
            self.obs_std.copy_(obs_NO.std(0).clamp_min(1e-3))
            self.rew_mean.copy_(reward_N.mean().reshape(1))
            self.rew_std.copy_(reward_N.std().clamp_min(1e-3).reshape(1))
            self.delta_std.copy_((next_obs_NO - obs_NO).std(0).clamp_min(1e-3))

    def norm_obs(self, obs_BO: torch.Tensor) -> torch.Tensor:
        return (obs_BO - self.obs_mean) / self.obs_std

    def split(self, transition_BD: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(obs, action_norm, reward (B, 1), next_obs) of encoded transitions."""
        o, a = self.obs_dim, self.act_dim
        return (
            transition_BD[:, :o],
            transition_BD[:, o : o + a],
            transition_BD[:, o + a : o + a + 1],
            transition_BD[:, o + a + 1 :],
        )

    # -- recurrence and heads -------------------------------------------------------------
    def absorb(
        self, transition_BD: torch.Tensor, done_B1: torch.Tensor, h_BH: torch.Tensor
    ) -> torch.Tensor:
        """``h' = GRU(h, embed(transition, done))``: the state after one more transition."""
        return self.gru(self.encode(transition_BD, done_B1), h_BH)

    def encode(self, transition_BD: torch.Tensor, done_B1: torch.Tensor) -> torch.Tensor:
        """The GRU's input for a transition: a tanh embedding of its standardized parts."""
        obs, action, reward, next_obs = self.split(transition_BD)
        x = torch.cat(
            [
                self.norm_obs(obs),
                action,
                (reward - self.rew_mean) / self.rew_std,
                self.norm_obs(next_obs),
                done_B1,
            ],
            dim=-1,
        )
        return self.embed_act(self.embed(x))

    def dist(self, obs_BO: torch.Tensor, h_BH: torch.Tensor) -> PolicyDist:
        """The policy's Gaussian over the pre-tanh action at (obs, h)."""
        mean = self.actor(torch.cat([self.norm_obs(obs_BO), h_BH], dim=-1))
        return PolicyDist(mean, self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX))

    def act_mean(self, obs_BO: torch.Tensor, h_BH: torch.Tensor) -> torch.Tensor:
        """Deterministic normalized action ``tanh(mean)`` in [-1, 1], (B, A)."""
        return torch.tanh(self.actor(torch.cat([self.norm_obs(obs_BO), h_BH], dim=-1)))

    def value(
        self, obs_BO: torch.Tensor, h_BH: torch.Tensor, progress_B1: torch.Tensor
    ) -> torch.Tensor:
        """V(obs, h, fraction of the trial elapsed), (B,), in (scaled) reward units."""
        x = torch.cat([self.norm_obs(obs_BO), h_BH, progress_B1], dim=-1)
        return self.critic(x).squeeze(-1)

    def aux_errors(self, transition_BD: torch.Tensor, h_BH: torch.Tensor) -> torch.Tensor:
        """Squared prediction errors (B, 1 + O) of the normalized reward and obs change of a
        transition, predicted from the state *before* it (h) and its (obs, action)."""
        obs, action, reward, next_obs = self.split(transition_BD)
        pred = self.aux(torch.cat([h_BH, self.norm_obs(obs), action], dim=-1))
        target = torch.cat(
            [(reward - self.rew_mean) / self.rew_std, (next_obs - obs) / self.delta_std], dim=-1
        )
        return (pred - target).pow(2)

    def surprise(self, transition_BD: torch.Tensor, h_BH: torch.Tensor) -> torch.Tensor:
        """How unexpected a transition is under ``h`` (before absorbing it), (B,); its mean over
        training-like transitions is about 1."""
        return self._per_dim_surprise(self.aux_errors(transition_BD, h_BH)) / self.surprise_scale

    def _per_dim_surprise(self, errors_BD: torch.Tensor) -> torch.Tensor:
        return (errors_BD / self.err_scale).mean(-1)

    def update_surprise_scales(self, errors_ND: torch.Tensor, momentum: float) -> None:
        """Running averages of the per-dimension squared error (floored) and of the resulting
        per-dimension-normalized score: the two scales of :meth:`surprise`."""
        with torch.no_grad():
            new = errors_ND.mean(0).clamp_min(ERR_SCALE_FLOOR)
            self.err_scale.mul_(momentum).add_((1.0 - momentum) * new)
            score = self._per_dim_surprise(errors_ND).mean().clamp_min(1e-6)
            self.surprise_scale.mul_(momentum).add_((1.0 - momentum) * score)

    def initial_state(self, batch: int) -> torch.Tensor:
        """The declared initial hidden state (zeros), (B, H)."""
        return torch.zeros(batch, self.hidden_size)
