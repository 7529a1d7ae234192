"""MAML's inner step: vanilla policy gradient with a fitted linear baseline, as pure functions.

:func:`adapt` is exactly what the device's ONNX adapt graph computes (it is traced from this
function by :mod:`export.maml_graphs`); meta-training calls :func:`inner_update` with the same
surrogate, differentiating through it (``torch.func.grad`` composes with outer autograd).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from training.maml_networks import (
    InnerBatch,
    PolicyLayout,
    advantages,
    constant_like,
    log_prob,
    sanitize,
)


class AdaptSettings(NamedTuple):
    """Constants of an inner step (baked into the adapt graph)."""

    layout: PolicyLayout
    horizon: int  # steps per episode slot in the buffer
    gamma: float  # discount of the returns-to-go
    ridge: float  # ridge coefficient of the baseline fit (feature units)
    steps: int  # inner gradient steps on the same episodes
    lr_scale: np.ndarray | None = None  # (W,) Meta-SGD per-weight step sizes, times inner_lr


class AdaptOutputs(NamedTuple):
    """What one adaptation returns, per row (all float32 except ``ok``)."""

    weights: torch.Tensor  # (B, W) new weights, or the old ones where not ok
    ok: torch.Tensor  # (B,) bool: new weights finite (else the old ones are returned)
    loss_before: torch.Tensor  # (B,) surrogate at the incoming weights
    loss_after: torch.Tensor  # (B,) surrogate at the new weights
    grad_norm: torch.Tensor  # (B,) L2 norm of the first inner gradient
    step_norm: torch.Tensor  # (B,) L2 norm of new - old weights


def surrogate(
    w_BW: torch.Tensor,
    batch: InnerBatch,
    adv_BN: torch.Tensor,
    layout: PolicyLayout,
    old_logp_BN: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row policy-gradient loss ``(B,)``: ``-mean_valid(logp * A)``.

    With ``old_logp_BN`` (the sampling policy's log-density) the likelihood ratio
    ``exp(logp - old_logp)`` replaces ``logp``: the same gradient at the sampling weights, and
    ProMP's low-variance curvature estimate when meta-training differentiates through it.
    """
    logp = log_prob(batch.obs_BNO, batch.action_BNA, w_BW, layout)
    weight = logp if old_logp_BN is None else torch.exp(logp - old_logp_BN)
    n_valid = batch.mask_BN.sum(dim=1).clamp(min=1.0)
    return -(weight * adv_BN * batch.mask_BN).sum(dim=1) / n_valid


def batch_advantages(batch: InnerBatch, settings: AdaptSettings) -> torch.Tensor:
    """Normalized advantages of a (sanitized) batch, treated as constants by the inner step.

    Computed in float64: the baseline's normal equations are ill-conditioned enough that
    float32 rounding differences between torch and onnxruntime reached 1e-5 in the adapted
    weights of a trained policy; in float64 they stay far below float32 resolution.
    """
    adv = advantages(
        batch.obs_BNO.double(),
        batch.reward_BN.double(),
        batch.mask_BN.double(),
        settings.horizon,
        settings.gamma,
        settings.ridge,
    )
    return adv.float()


def inner_update(
    w_BW: torch.Tensor,
    batch: InnerBatch,
    adv_BN: torch.Tensor,
    lr_B1: torch.Tensor,
    settings: AdaptSettings,
    old_logp_BN: torch.Tensor | None = None,
) -> torch.Tensor:
    """``settings.steps`` gradient steps ``w <- w - lr * grad`` on the surrogate; differentiable
    with respect to ``w_BW`` when it requires grad (the MAML meta-gradient)."""

    def total(w: torch.Tensor) -> torch.Tensor:
        return surrogate(w, batch, adv_BN, settings.layout, old_logp_BN).sum()

    grad_fn = torch.func.grad(total)
    for _ in range(settings.steps):
        w_BW = w_BW - lr_B1 * grad_fn(w_BW)
    return w_BW


def adapt(
    w_BW: torch.Tensor,
    obs_BNO: torch.Tensor,
    action_BNA: torch.Tensor,
    reward_BN: torch.Tensor,
    mask_BN: torch.Tensor,
    lr_B1: torch.Tensor,
    settings: AdaptSettings,
) -> AdaptOutputs:
    """The device's adaptation: baseline fit, ``steps`` inner steps, finiteness check, stats.

    The step size is ``lr_B1`` times ``settings.lr_scale`` (Meta-SGD's per-weight step sizes,
    a constant of the graph) when the run learned one per weight.

    Masked slots are zeroed first, so anything in them (NaN included) has no effect; a NaN in a
    valid slot makes the new weights non-finite and ``ok`` False (the old weights come back).
    """
    batch = sanitize(InnerBatch(obs_BNO, action_BNA, reward_BN, mask_BN))
    adv = batch_advantages(batch, settings)
    layout = settings.layout

    lr = lr_B1 if settings.lr_scale is None else lr_B1 * constant_like(settings.lr_scale, w_BW)
    w, loss_before, grad_norm = w_BW, None, None
    for _ in range(settings.steps):
        grad, per_row = _grad_and_loss(w, batch, adv, layout)
        if loss_before is None:
            loss_before, grad_norm = per_row, torch.sqrt((grad * grad).sum(dim=1))
        w = w - lr * grad
    loss_after = surrogate(w, batch, adv, layout)
    ok = torch.isfinite(w).all(dim=1)
    new = torch.where(ok.unsqueeze(1), w, w_BW)
    step = new - w_BW
    return AdaptOutputs(
        new, ok, loss_before, loss_after, grad_norm, torch.sqrt((step * step).sum(dim=1))
    )


def _grad_and_loss(
    w_BW: torch.Tensor, batch: InnerBatch, adv_BN: torch.Tensor, layout: PolicyLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed surrogate (no graph kept) and the per-row loss; rows are
    independent, so the gradient of the sum is each row's own gradient."""
    with torch.enable_grad():
        w = w_BW.detach().requires_grad_(True)
        per_row = surrogate(w, batch, adv_BN, layout)
        (grad,) = torch.autograd.grad(per_row.sum(), w)
    return grad.detach(), per_row.detach()
