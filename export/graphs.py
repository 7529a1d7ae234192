"""Torch modules that become the bundle's ONNX graphs, and their I/O signatures.

Every graph is stateless: the belief goes in and comes out (natural parameters), so the same
graph serves one agent or a fleet (dynamic batch axis ``batch``).

- ``step``: the fused per-step graph. It absorbs the latest transition into the belief, flags
  rows where that is not finite (``updated`` False: the runtime keeps the old belief), scores
  how surprising the transition was under the belief *before* the update, and returns the
  deterministic action for ``obs`` under the updated posterior mean, both normalized and scaled
  to the action bounds.
- ``encoder``: transition -> Gaussian factor (mu, var).
- ``policy``: (obs, z) -> deterministic action, normalized and scaled.

The arithmetic mirrors :mod:`runtime.posterior` operation by operation so that the fused graph
and the numpy belief agree to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from runtime.tasks.base import FamilySpec
from training.networks import ContextEncoder, TanhGaussianActor

BATCH = "batch"

STEP_INPUTS = ("transition", "precision", "eta", "forget", "obs")
STEP_OUTPUTS = ("action", "action_norm", "precision_out", "eta_out", "surprise", "updated")
ENCODER_INPUTS = ("transition",)
ENCODER_OUTPUTS = ("mu", "var")
POLICY_INPUTS = ("obs", "z")
POLICY_OUTPUTS = ("action", "action_norm")


@dataclass(frozen=True)
class Dims:
    """Sizes the graphs are built for."""

    obs: int
    act: int
    latent: int

    @property
    def transition(self) -> int:
        return 2 * self.obs + self.act + 1


def tensor_shapes(graph: str, dims: Dims) -> dict[str, tuple[list[int | str], str]]:
    """Name -> (shape with ``"batch"`` for the dynamic axis, dtype) of every I/O of ``graph``."""
    b = BATCH
    table: dict[str, tuple[list[int | str], str]] = {
        "transition": ([b, dims.transition], "float32"),
        "precision": ([b, dims.latent], "float32"),
        "eta": ([b, dims.latent], "float32"),
        "forget": ([b, 1], "float32"),
        "obs": ([b, dims.obs], "float32"),
        "z": ([b, dims.latent], "float32"),
        "action": ([b, dims.act], "float32"),
        "action_norm": ([b, dims.act], "float32"),
        "precision_out": ([b, dims.latent], "float32"),
        "eta_out": ([b, dims.latent], "float32"),
        "surprise": ([b], "float32"),
        "updated": ([b], "bool"),  # False: transition or result not finite, keep old belief
        "mu": ([b, dims.latent], "float32"),
        "var": ([b, dims.latent], "float32"),
    }
    names = {
        "step": STEP_INPUTS + STEP_OUTPUTS,
        "encoder": ENCODER_INPUTS + ENCODER_OUTPUTS,
        "policy": POLICY_INPUTS + POLICY_OUTPUTS,
    }[graph]
    return {n: table[n] for n in names}


class ActionScale(nn.Module):
    """[-1, 1] -> physical bounds: ``low + (high - low) / 2 * (a + 1)`` (training.agent),
    computed as ``a * half + (low + half)`` and clamped to ``[low, high]`` so that float32
    rounding can never put the action an ulp outside the bounds (the runtime then needs no
    numpy clip on the hot path)."""

    def __init__(self, spec: FamilySpec) -> None:
        super().__init__()
        low = torch.as_tensor(spec.act_low, dtype=torch.float32)
        high = torch.as_tensor(spec.act_high, dtype=torch.float32)
        half = (high - low) / 2.0
        self.register_buffer("half_range", half)
        self.register_buffer("center", low + half)
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def forward(self, action_BA: torch.Tensor) -> torch.Tensor:
        scaled = action_BA * self.half_range + self.center
        return torch.minimum(torch.maximum(scaled, self.low), self.high)


class MeanActor(nn.Module):
    """``tanh(mean)`` of a :class:`TanhGaussianActor` without computing the log-std half of its
    last layer: the same numbers as ``actor.deterministic``, one Slice node and half the last
    matrix fewer in the graph. Shares the actor's parameters (``actor.net.*``)."""

    def __init__(self, actor: TanhGaussianActor) -> None:
        super().__init__()
        self.net = actor.net
        self.act_dim = actor.act_dim

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.net[:-1](torch.cat([obs, z], dim=-1))
        last = self.net[-1]
        return torch.tanh(F.linear(h, last.weight[: self.act_dim], last.bias[: self.act_dim]))


class StepGraph(nn.Module):
    """Fused step: (transition, precision, eta, forget, obs) -> action, belief', surprise.

    ``updated`` is False for a row whose transition or updated belief is not finite; the
    runtime then keeps that row's old belief (the inputs) and discards the row's action. The
    check multiplies everything by 0 and sums (NaN for any NaN/inf, else exactly 0): a handful
    of graph nodes instead of IsNaN/IsInf per tensor, because at batch 1 every node costs
    about as much as a small matrix product.
    """

    def __init__(
        self,
        encoder: ContextEncoder,
        actor: TanhGaussianActor,
        spec: FamilySpec,
        prior_var: float,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.actor = MeanActor(actor)
        self.scale = ActionScale(spec)
        self.prior_prec = float(1.0 / prior_var)

    def forward(
        self,
        transition: torch.Tensor,
        precision: torch.Tensor,
        eta: torch.Tensor,
        forget: torch.Tensor,
        obs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        mu, var = self.encoder(transition)
        inv = 1.0 / var
        new_prec = self.prior_prec + forget * (precision - self.prior_prec) + inv
        new_eta = forget * eta + mu * inv
        d = mu - eta / precision
        surprise = (d * d / (1.0 / precision + var)).mean(dim=-1)
        check = (torch.cat([transition, new_prec, new_eta], dim=-1) * 0.0).sum(dim=-1)
        updated = check == 0.0
        action_norm = self.actor(obs, new_eta / new_prec)
        return self.scale(action_norm), action_norm, new_prec, new_eta, surprise, updated


class EncoderGraph(nn.Module):
    """transition -> (mu, var) of the Gaussian factor over the latent."""

    def __init__(self, encoder: ContextEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, transition: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(transition)


class PolicyGraph(nn.Module):
    """(obs, z) -> deterministic action (scaled, normalized)."""

    def __init__(self, actor: TanhGaussianActor, spec: FamilySpec) -> None:
        super().__init__()
        self.actor = actor
        self.scale = ActionScale(spec)

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        action_norm = self.actor.deterministic(obs, z)
        return self.scale(action_norm), action_norm


def example_inputs(graph: str, dims: Dims, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Dummy inputs used to trace ``graph`` (values do not matter, shapes and dtypes do)."""
    shapes = tensor_shapes(graph, dims)
    inputs = {"step": STEP_INPUTS, "encoder": ENCODER_INPUTS, "policy": POLICY_INPUTS}[graph]
    out = []
    for name in inputs:
        shape, dtype = shapes[name]
        concrete = [batch if s == BATCH else int(s) for s in shape]
        if dtype == "bool":
            out.append(torch.ones(concrete, dtype=torch.bool))
        else:
            out.append(torch.ones(concrete, dtype=torch.float32))
    return tuple(out)
