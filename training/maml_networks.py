"""MAML's Gaussian MLP policy and linear feature baseline, written over a flat weight vector.

Everything here is a pure function of tensors so that the same code runs in meta-training (with
the gradient through the inner step), in the exported ONNX graphs (policy with weights as an
input, and the adapt graph) and in the torch reference the graphs are checked against.

- Policy: ``mean = MLP_tanh(obs)`` (hidden tanh layers, linear output), in normalized action
  units (the physical action is ``ActionScale(clip(sample, -1, 1))``); a state-independent,
  learned ``log_std`` per action dimension. The flat vector ``w`` holds, in order, each layer's
  weight ``(in, out)`` and bias ``(out,)``, then ``log_std`` ``(A,)``. The inner step adapts all
  of it, as in MAML.
- Baseline (rllab's ``LinearFeatureBaseline``, used by MAML): per task, ridge regression of the
  discounted returns-to-go on features ``[o, o², t, t², t³, 1]`` (o clipped to ±10, t = step /
  horizon), solved by an unrolled Cholesky factorization (ONNX has no linear solver).
- Buffers of episodes are laid out episode-major with fixed slots: slot ``n = e * H + t`` holds
  step ``t`` of episode ``e`` (``H`` = horizon); a ``mask`` marks the slots actually flown.

Shapes: ``B`` tasks (rows), ``N`` transitions per row, ``O``/``A`` obs/action sizes, ``W`` weights.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

LOG_2PI = math.log(2.0 * math.pi)
OBS_FEATURE_CLIP = 10.0


@dataclass(frozen=True)
class PolicyLayout:
    """Sizes of the Gaussian MLP and where each tensor sits in the flat weight vector."""

    obs_dim: int
    act_dim: int
    hidden: tuple[int, ...] = (64, 64)

    @property
    def widths(self) -> tuple[int, ...]:
        return (self.obs_dim, *self.hidden, self.act_dim)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the pieces of ``w`` in order: (in, out), (out,) per layer, then (A,)."""
        out: list[tuple[int, ...]] = []
        for n_in, n_out in zip(self.widths[:-1], self.widths[1:], strict=True):
            out += [(n_in, n_out), (n_out,)]
        return [*out, (self.act_dim,)]

    @property
    def num_weights(self) -> int:
        return sum(math.prod(s) for s in self.shapes)


class GaussianMLP(nn.Module):
    """The nn.Module form of the policy: what initializes ``w`` and what the functional
    :func:`policy_mean` must equal (tested)."""

    def __init__(self, layout: PolicyLayout, init_std: float = 1.0) -> None:
        super().__init__()
        widths = layout.widths
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.log_std = nn.Parameter(torch.full((layout.act_dim,), math.log(init_std)))

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        h = obs
        for layer in self.layers[:-1]:
            h = torch.tanh(layer(h))
        return self.layers[-1](h)

    def flat_weights(self) -> torch.Tensor:
        """The parameters as one vector in :class:`PolicyLayout` order."""
        parts: list[torch.Tensor] = []
        for layer in self.layers:
            parts += [layer.weight.detach().T.reshape(-1), layer.bias.detach()]
        return torch.cat([*parts, self.log_std.detach()])


def init_weights(layout: PolicyLayout, init_std: float, seed: int) -> torch.Tensor:
    """Fresh flat weights ``(W,)`` (torch's default Linear init, seeded)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GaussianMLP(layout, init_std).flat_weights().clone()


def unflatten(w_BW: torch.Tensor, layout: PolicyLayout) -> list[torch.Tensor]:
    """Per-row pieces of ``w``: ``[(B, in, out), (B, out), ..., (B, A)]``.

    ``torch.split`` (not slicing) so that the traced backward is a Concat, which ONNX has.
    """
    sizes = [math.prod(s) for s in layout.shapes]
    pieces = torch.split(w_BW, sizes, dim=-1)
    return [p.reshape(-1, *s) for p, s in zip(pieces, layout.shapes, strict=True)]


def policy_mean(obs_BNO: torch.Tensor, w_BW: torch.Tensor, layout: PolicyLayout) -> torch.Tensor:
    """Mean action ``(B, N, A)`` in normalized units for ``N`` observations per weight row."""
    pieces = unflatten(w_BW, layout)
    h = obs_BNO
    n_layers = len(layout.widths) - 1
    for i in range(n_layers):
        weight, bias = pieces[2 * i], pieces[2 * i + 1]
        h = torch.bmm(h, weight) + bias.unsqueeze(1)
        if i < n_layers - 1:
            h = torch.tanh(h)
    return h


def policy_log_std(w_BW: torch.Tensor, layout: PolicyLayout) -> torch.Tensor:
    """Log standard deviation ``(B, A)`` (normalized action units)."""
    return unflatten(w_BW, layout)[-1]


def log_prob(
    obs_BNO: torch.Tensor, action_BNA: torch.Tensor, w_BW: torch.Tensor, layout: PolicyLayout
) -> torch.Tensor:
    """Gaussian log-density ``(B, N)`` of the raw (unclipped) sampled actions."""
    mean = policy_mean(obs_BNO, w_BW, layout)
    log_std = policy_log_std(w_BW, layout).unsqueeze(1)
    z = (action_BNA - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * LOG_2PI).sum(dim=-1)


# -- baseline and advantages ----------------------------------------------------------------------
class InnerBatch(NamedTuple):
    """The episodes of one inner step, per task row (masked slots are ignored)."""

    obs_BNO: torch.Tensor
    action_BNA: torch.Tensor  # raw Gaussian samples, normalized units
    reward_BN: torch.Tensor
    mask_BN: torch.Tensor  # 1 = a flown slot, 0 = empty


def discount_matrix(horizon: int, gamma: float) -> torch.Tensor:
    """``D[k, t] = gamma^(k - t)`` for ``k >= t`` else 0: returns-to-go are ``r @ D``."""
    idx = np.arange(horizon, dtype=np.float64)
    power = idx[:, None] - idx[None, :]
    disc = np.where(power >= 0, gamma ** np.maximum(power, 0.0), 0.0)
    return torch.from_numpy(disc)


def returns_to_go(reward_BN: torch.Tensor, horizon: int, gamma: float) -> torch.Tensor:
    """Discounted returns-to-go ``(B, N)`` within each episode slot of ``horizon`` steps."""
    b, n = reward_BN.shape
    per_episode = reward_BN.reshape(b, n // horizon, horizon)
    disc = constant_like(discount_matrix(horizon, gamma).numpy(), reward_BN)
    return torch.matmul(per_episode, disc).reshape(b, n)


def baseline_features(obs_BNO: torch.Tensor, horizon: int) -> torch.Tensor:
    """rllab's linear-baseline features ``(B, N, 2 O + 4)``: o, o², t, t², t³, 1."""
    b, n, _ = obs_BNO.shape
    o = obs_BNO.clamp(-OBS_FEATURE_CLIP, OBS_FEATURE_CLIP)
    t = constant_like((np.arange(n) % horizon) / horizon, obs_BNO)
    t = t.reshape(1, n, 1).expand(b, n, 1)
    return torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)


def fit_baseline(
    feat_BND: torch.Tensor, target_BN: torch.Tensor, mask_BN: torch.Tensor, ridge: float
) -> torch.Tensor:
    """Per-row ridge regression coefficients ``(B, D)`` on the masked rows.

    Normal equations averaged over the valid rows, ``(FᵀMF / n + ridge I) c = FᵀMy / n``; with
    no valid row the solution is 0.
    """
    n_valid = mask_BN.sum(dim=1).clamp(min=1.0).reshape(-1, 1, 1)
    fm = feat_BND * mask_BN.unsqueeze(-1)
    gram = torch.matmul(fm.transpose(1, 2), feat_BND) / n_valid
    eye = constant_like(np.eye(feat_BND.shape[-1]), feat_BND)
    rhs = torch.matmul(fm.transpose(1, 2), target_BN.unsqueeze(-1)).squeeze(-1) / n_valid[:, 0]
    return cholesky_solve(gram + ridge * eye, rhs)


def cholesky_solve(a_BDD: torch.Tensor, b_BD: torch.Tensor) -> torch.Tensor:
    """Solve ``A x = b`` for symmetric positive definite ``A``, unrolled over the (static) size D.

    Only elementwise ops, sums and a square root: traceable into any ONNX runtime. Column j of
    the Cholesky factor L is kept as a ``(B, D)`` vector with zeros above row j.
    """
    d = a_BDD.shape[-1]
    eye = constant_like(np.eye(d), a_BDD)
    lower = constant_like(np.tril(np.ones((d, d))), a_BDD)  # [:, j]: rows >= j
    cols: list[torch.Tensor] = []
    for j in range(d):
        v = a_BDD[:, :, j]
        for k in range(j):
            v = v - cols[k] * cols[k][:, j : j + 1]
        cols.append(v * lower[:, j] / torch.sqrt(v[:, j : j + 1]))
    # forward substitution L y = b, one column at a time
    rest, ys = b_BD, []
    for j in range(d):
        yj = rest[:, j : j + 1] / cols[j][:, j : j + 1]
        rest = rest - cols[j] * yj
        ys.append(yj)
    y = torch.cat(ys, dim=1)
    # back substitution Lᵀ x = y (cols[j] · x only sees the rows > j solved so far)
    x = torch.zeros_like(b_BD)
    for j in reversed(range(d)):
        xj = (y[:, j : j + 1] - (cols[j] * x).sum(dim=1, keepdim=True)) / cols[j][:, j : j + 1]
        x = x + xj * eye[j]
    return x


def advantages(
    obs_BNO: torch.Tensor,
    reward_BN: torch.Tensor,
    mask_BN: torch.Tensor,
    horizon: int,
    gamma: float,
    ridge: float,
) -> torch.Tensor:
    """Baseline-subtracted, per-row normalized advantages ``(B, N)`` (0 on masked slots)."""
    ret = returns_to_go(reward_BN * mask_BN, horizon, gamma)
    feat = baseline_features(obs_BNO, horizon)
    coef = fit_baseline(feat, ret, mask_BN, ridge)
    adv = (ret - torch.matmul(feat, coef.unsqueeze(-1)).squeeze(-1)) * mask_BN
    n_valid = mask_BN.sum(dim=1, keepdim=True).clamp(min=1.0)
    mean = adv.sum(dim=1, keepdim=True) / n_valid
    centred = (adv - mean) * mask_BN
    std = torch.sqrt((centred * centred).sum(dim=1, keepdim=True) / n_valid)
    return centred / (std + 1e-8)


def sanitize(batch: InnerBatch) -> InnerBatch:
    """Zero every masked slot, so that NaN or garbage there cannot reach the result
    (``0 * NaN`` is NaN: a product with the mask is not enough)."""
    keep = batch.mask_BN > 0.5
    zero = torch.zeros((), dtype=batch.obs_BNO.dtype)
    return InnerBatch(
        torch.where(keep.unsqueeze(-1), batch.obs_BNO, zero),
        torch.where(keep.unsqueeze(-1), batch.action_BNA, zero),
        torch.where(keep, batch.reward_BN, zero),
        torch.where(keep, torch.ones((), dtype=zero.dtype), zero),
    )


def constant_like(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A constant in ``like``'s float dtype (built in numpy: traced as a plain constant)."""
    np_dtype = np.float64 if like.dtype == torch.float64 else np.float32
    return torch.from_numpy(np.asarray(array, dtype=np_dtype))
