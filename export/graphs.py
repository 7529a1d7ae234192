"""Torch modules that become the bundle's ONNX graphs, and their I/O signatures.

Every graph is stateless: the belief goes in and comes out (natural parameters), so the same
graph serves one agent or a fleet (dynamic batch axis ``batch``).

- ``step``: the fused per-step graph. It absorbs the latest transition into the belief, flags
  rows where that is not finite (``updated`` False: the runtime keeps the old belief), scores
  how surprising the transition was under the belief *before* the update, and returns the
  deterministic action for ``obs`` under the updated posterior mean, both normalized and scaled
  to the action bounds.
- ``encoder``: transition -> Gaussian factor (mu, var), plus its rank-one precision directions
  ``u`` when the run has ``model.factor_rank`` > 0 (``var`` absent without a diagonal part).

With rank-one directions the belief is a full Gaussian and the step graph carries it as
(``cov``, ``mean``), absorbing a transition in closed form with one 5x5 inverse (see
:class:`FullStepGraph`; :mod:`runtime.posterior` reaches the same posterior by sequential
rank-one Kalman updates).
- ``act``: (obs, belief) -> deterministic action under the belief mean, normalized and scaled
  (the adaptation contract's act graph: the runtime feeds it the state it keeps).

The diagonal step mirrors :mod:`runtime.posterior` operation by operation, and the full step
computes the same posterior in closed form, so that the fused graph and the numpy belief agree
to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from runtime.posterior import belief_io
from runtime.tasks.base import FamilySpec
from training.networks import ContextEncoder, Factor, TanhGaussianActor

BATCH = "batch"

ENCODER_INPUTS = ("transition",)
ACT_OUTPUTS = ("action", "action_norm")


@dataclass(frozen=True)
class Dims:
    """Sizes the graphs are built for, and the kind of factor the encoder emits."""

    obs: int
    act: int
    latent: int
    rank: int = 0  # rank-one precision directions per factor (0: diagonal PEARL factors)
    diagonal: bool = True  # whether factors have a diagonal part
    prior_var: float = 1.0  # the belief's prior (random test beliefs are drawn around it)

    @property
    def transition(self) -> int:
        return 2 * self.obs + self.act + 1

    @property
    def full(self) -> bool:
        """A full-covariance belief (factors with rank-one directions)."""
        return self.rank > 0

    # The graph I/O interface every family's dims object offers (export.family.GraphDims).
    def graph_io(self, graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return graph_io(graph, self)

    def tensor_shapes(self, graph: str) -> dict[str, tuple[list[int | str], str]]:
        return tensor_shapes(graph, self)

    def random_step_inputs(
        self, spec: FamilySpec, n: int, rng: object, nonfinite_share: float = 0.02
    ) -> dict[str, object]:
        from export.reference import random_step_inputs

        return random_step_inputs(self, spec, n, rng, self.prior_var, nonfinite_share)


def graph_io(graph: str, dims: Dims) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of ``graph`` ("step", "encoder" or "act") for these dims."""
    b_in, b_out = belief_io(dims.full)
    if graph == "step":
        return (
            ("transition", *b_in, "forget", "obs"),
            ("action", "action_norm", *b_out, "surprise", "updated"),
        )
    if graph == "encoder":
        outs = ("mu",) + (("var",) if dims.diagonal else ()) + (("u",) if dims.rank else ())
        return ENCODER_INPUTS, outs
    return ("obs", "mean") if dims.full else ("obs", *b_in), ACT_OUTPUTS


def tensor_shapes(graph: str, dims: Dims) -> dict[str, tuple[list[int | str], str]]:
    """Name -> (shape with ``"batch"`` for the dynamic axis, dtype) of every I/O of ``graph``."""
    b, z = BATCH, dims.latent
    table: dict[str, tuple[list[int | str], str]] = {
        "transition": ([b, dims.transition], "float32"),
        "precision": ([b, z], "float32"),
        "eta": ([b, z], "float32"),
        "cov": ([b, z, z], "float32"),
        "mean": ([b, z], "float32"),
        "forget": ([b, 1], "float32"),
        "obs": ([b, dims.obs], "float32"),
        "action": ([b, dims.act], "float32"),
        "action_norm": ([b, dims.act], "float32"),
        "precision_out": ([b, z], "float32"),
        "eta_out": ([b, z], "float32"),
        "cov_out": ([b, z, z], "float32"),
        "mean_out": ([b, z], "float32"),
        "surprise": ([b], "float32"),
        "updated": ([b], "bool"),  # False: transition or result not finite, keep old belief
        "mu": ([b, z], "float32"),
        "var": ([b, z], "float32"),
        "u": ([b, z, dims.rank], "float32"),
    }
    inputs, outputs = graph_io(graph, dims)
    return {n: table[n] for n in inputs + outputs}


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
    matrix fewer in the graph, clamped to [-1, 1]. Shares the actor's parameters
    (``actor.net.*``)."""

    def __init__(self, actor: TanhGaussianActor) -> None:
        super().__init__()
        self.net = actor.net
        self.act_dim = actor.act_dim

    def forward(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = self.net[:-1](torch.cat([obs, z], dim=-1))
        last = self.net[-1]
        mean = F.linear(h, last.weight[: self.act_dim], last.bias[: self.act_dim])
        # onnxruntime's Tanh overshoots by up to 2e-7 when saturated (1.0000002): clamp, so that
        # the normalized action is in [-1, 1] as the runtime promises (the health gate checks).
        return torch.tanh(mean).clamp(-1.0, 1.0)


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


class FullStepGraph(StepGraph):
    """Fused step for a full belief: (transition, cov, mean, forget, obs) -> action, belief',
    surprise. Same contract and modules as :class:`StepGraph`.

    The factor is Z + R scalar measurements ``h . mu = h . z + N(0, noise)``, the columns of
    ``H^T = [I | U]`` with noise ``[var | 1]`` (no ``I`` part without a diagonal), so its
    precision is ``Pm = H^T N^-1 H``. With the forgotten covariance
    ``C = lam cov + (1 - lam) prior_var I`` and ``T = I + C Pm``, the posterior in closed form is

        cov' = (C^-1 + Pm)^-1 = T^-1 C,    mean' = mean + cov' Pm d = mu - T^-1 d,  d = mu - mean

    (``cov' Pm = T^-1 (T - I)``): the posterior :func:`runtime.posterior.update_full_belief`
    reaches by Z + R sequential rank-one Kalman updates, in ~60 graph nodes instead of ~155 (at
    batch 1 a node costs about as much as a small matrix product). ``T`` is not symmetric and
    is ill-conditioned on confident beliefs, so the Z x Z algebra runs in float64 (float32 loses
    up to 1e-3 of the mean there, and a float32 ``U U^T`` blurs the directions' rank-one
    structure), and ``T^-1`` is onnxruntime's ``com.microsoft.Inverse`` (ONNX has no inverse;
    :func:`export.onnx_export.register_inverse`). The surprise is each measurement's normalized
    innovation under the belief before the step, as :func:`runtime.posterior.full_surprise`.
    """

    def __init__(
        self,
        encoder: ContextEncoder,
        actor: TanhGaussianActor,
        spec: FamilySpec,
        prior_var: float,
    ) -> None:
        super().__init__(encoder, actor, spec, prior_var)
        z = encoder.latent_dim
        # The encoder's output columns: mu, the diagonal part (if any), the directions.
        self.split_sizes = [z] + ([z] if encoder.per_transition_var else []) + [z * encoder.rank]

    def factor(self, transition: torch.Tensor) -> Factor:
        """``encoder.factor`` for a (B, D) batch with fewer graph nodes: one Split and a
        constant-shape Reshape instead of slices and a shape computation (same numbers)."""
        enc = self.encoder
        parts = enc.net(transition).split(self.split_sizes, dim=-1)
        var = enc.variance(parts[1] if enc.per_transition_var else None, parts[0])
        u = enc.u_max * torch.tanh(parts[-1] / enc.u_max)
        return Factor(parts[0], var, u.reshape(-1, enc.latent_dim, enc.rank))

    def forward(
        self,
        transition: torch.Tensor,
        cov: torch.Tensor,
        mean: torch.Tensor,
        forget: torch.Tensor,
        obs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        f = self.factor(transition)
        h_t, noise = self.measurements(f)
        d = (f.mu - mean).unsqueeze(-2)  # (B, 1, Z)
        innovation = torch.matmul(d, h_t)
        spread = (h_t * torch.matmul(cov, h_t)).sum(-2, keepdim=True) + noise
        surprise = (innovation * innovation / spread).mean(dim=(-2, -1))
        eye = torch.eye(self.encoder.latent_dim, dtype=torch.float64)  # constant-folded
        lam = forget.unsqueeze(-1)  # not lam (cov - P) + P: exact at lam = 1 for tiny variances
        c = (lam * cov + (1.0 - lam) * (eye.float() / self.prior_prec)).double()
        h64 = h_t.double()
        precision = torch.matmul(h64 / noise.double(), h64.transpose(-1, -2))  # H^T N^-1 H
        inv = torch.linalg.inv(torch.matmul(c, precision) + eye)
        new_cov = torch.matmul(inv, c)
        new_cov = (0.5 * (new_cov + new_cov.transpose(-1, -2))).float()
        step = torch.matmul(d.double(), inv.transpose(-1, -2)).float()  # (T^-1 d)^T
        new_mean = f.mu - step.squeeze(-2)
        flat = torch.cat([transition, new_cov.flatten(1), new_mean], dim=-1)
        updated = (flat * 0.0).sum(dim=-1) == 0.0
        action_norm = self.actor(obs, new_mean)
        return self.scale(action_norm), action_norm, new_cov, new_mean, surprise, updated

    def measurements(self, f: Factor) -> tuple[torch.Tensor, torch.Tensor]:
        """``H^T = [I | U]`` (B, Z, Z + R) and the noise ``[var | 1]`` as (B, 1, Z + R), built by
        padding (two Pad and an Add node; no batch-sized constant)."""
        r = self.encoder.rank
        if f.var is None:
            return f.u, torch.ones_like(f.u[:, :1, :])
        z = self.encoder.latent_dim
        h_t = F.pad(f.u, (z, 0)) + F.pad(torch.eye(z), (0, r))
        return h_t, F.pad(f.var.unsqueeze(-2), (0, r), value=1.0)


def step_graph(
    encoder: ContextEncoder, actor: TanhGaussianActor, spec: FamilySpec, prior_var: float
) -> nn.Module:
    """The fused step graph for this encoder's kind of factor."""
    cls = FullStepGraph if encoder.rank else StepGraph
    return cls(encoder, actor, spec, prior_var)


class EncoderGraph(nn.Module):
    """transition -> the Gaussian factor over the latent: (mu, var), (mu, var, u) or (mu, u)."""

    def __init__(self, encoder: ContextEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, transition: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.encoder.factor(transition)
        return tuple(t for t in f if t is not None)


class ActGraph(nn.Module):
    """(obs, precision, eta) or (obs, mean) -> deterministic action (scaled, normalized) at
    the belief mean: the act graph of the adaptation contract."""

    def __init__(self, actor: TanhGaussianActor, spec: FamilySpec, full: bool) -> None:
        super().__init__()
        self.actor = MeanActor(actor)
        self.scale = ActionScale(spec)
        self.full = full

    def forward(self, obs: torch.Tensor, *belief: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = belief[0] if self.full else belief[1] / belief[0]  # mean, or eta / precision
        action_norm = self.actor(obs, z)
        return self.scale(action_norm), action_norm


def example_inputs(graph: str, dims: Any, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Dummy inputs used to trace ``graph`` (values do not matter, shapes and dtypes do);
    ``dims`` is any family's dims object (:class:`export.family.GraphDims`)."""
    shapes = dims.tensor_shapes(graph)
    inputs = dims.graph_io(graph)[0]
    out = []
    for name in inputs:
        shape, dtype = shapes[name]
        concrete = [batch if s == BATCH else int(s) for s in shape]
        if dtype == "bool":
            out.append(torch.ones(concrete, dtype=torch.bool))
        else:
            out.append(torch.ones(concrete, dtype=torch.float32))
    return tuple(out)
