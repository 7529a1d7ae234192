"""MAML's device graphs: a policy whose weights are an input, and the adapt graph (inner step).

- ``maml_policy``: ``(obs (B, O), weights (B, W), noise (B, A))`` ->
  ``action`` (physical, clamped to the bounds), ``action_norm`` (clamped to [-1, 1]) and
  ``action_raw`` = mean + std * noise, the unclipped Gaussian sample the adapt buffer must record
  (the inner step's log-density is of that sample). noise = 0 gives the deterministic policy.
- ``maml_adapt``: ``(weights (B, W), obs (B, N, O), action_raw (B, N, A), reward (B, N),
  mask (B, N), inner_lr (B, 1))`` -> ``weights_out`` (B, W), ``ok`` (B,) bool, ``loss_before``,
  ``loss_after``, ``grad_norm``, ``step_norm`` (B,). N = episodes x horizon, slot ``e * H + t``
  (see :mod:`training.maml_networks`); the baseline fit, the discounted returns and
  ``inner_steps`` gradient steps all happen inside the graph. Where ``ok`` is False (non-finite
  new weights) ``weights_out`` is the incoming weights.

How the adapt graph is made: :func:`training.maml_inner.adapt` (``torch.func.grad`` inside) is
traced by ``torch.fx``'s ``make_fx`` into plain aten ops, forward and backward, with
``tanh_backward`` decomposed into ``1 - y²``; then the TorchScript exporter writes that graph
module. ``torch.func.grad`` straight into either exporter fails, and ``make_fx``'s full core-aten
decomposition emits ``slice_scatter``, which the exporter lacks; the narrower table avoids both.
The adapt graph has **static shapes** (``AdaptShape.batch`` rows, 1 by default): traced with
symbolic shapes, the backward ops still carry the example's batch size as constants, so a
dynamic batch axis would be wrong. Adapting happens at episode boundaries, not per step, so a
fleet runtime calls the B = 1 graph once per agent.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch._decomp import get_decompositions
from torch.fx.experimental.proxy_tensor import make_fx

from export.graphs import ActionScale
from export.onnx_export import DEFAULT_OPSET, export_module
from runtime.tasks.base import FamilySpec
from training.maml_inner import AdaptSettings, adapt
from training.maml_networks import PolicyLayout

POLICY_INPUTS = ("obs", "weights", "noise")
POLICY_OUTPUTS = ("action", "action_norm", "action_raw")
ADAPT_INPUTS = ("weights", "obs", "action_raw", "reward", "mask", "inner_lr")
ADAPT_OUTPUTS = ("weights_out", "ok", "loss_before", "loss_after", "grad_norm", "step_norm")


@dataclass(frozen=True)
class AdaptShape:
    """Static sizes of the adapt graph's buffer."""

    episodes: int  # episode slots in the buffer
    horizon: int  # steps per slot
    batch: int = 1  # rows (agents) adapted per call: the adapt graph's shapes are static

    @property
    def capacity(self) -> int:
        return self.episodes * self.horizon


class MAMLPolicyGraph(nn.Module):
    """Policy with its weights as an input; rows may carry different (adapted) weights."""

    def __init__(self, layout: PolicyLayout, spec: FamilySpec) -> None:
        super().__init__()
        self.layout = layout
        self.scale = ActionScale(spec)

    def forward(
        self, obs: torch.Tensor, weights: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pieces = torch.split(weights, self.sizes, dim=-1)
        raw = self.mean(obs, pieces) + torch.exp(pieces[-1]) * noise  # pieces[-1]: log-std
        norm = torch.clamp(raw, -1.0, 1.0)
        return self.scale(norm), norm, raw

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.layout.shapes]

    def mean(self, obs_BO: torch.Tensor, pieces: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """:func:`training.maml_networks.policy_mean` for one observation per row ``(B, A)``
        from the split weights, written for a small graph: each bias is cut straight to
        ``(B, 1, out)`` (no Unsqueeze node), the log-std is the Split's last piece as is."""
        layout = self.layout
        h = obs_BO.reshape(-1, 1, layout.obs_dim)
        n_layers = len(layout.widths) - 1
        for i, (n_in, n_out) in enumerate(itertools.pairwise(layout.widths)):
            weight = pieces[2 * i].reshape(-1, n_in, n_out)
            h = torch.matmul(h, weight) + pieces[2 * i + 1].reshape(-1, 1, n_out)
            if i < n_layers - 1:
                h = torch.tanh(h)
        return h.reshape(-1, layout.act_dim)


def adapt_function(settings: AdaptSettings):
    """The adapt computation as a function of the graph's inputs only (tuple out)."""

    def fn(weights, obs, action_raw, reward, mask, inner_lr):
        return tuple(adapt(weights, obs, action_raw, reward, mask, inner_lr, settings))

    return fn


def example_adapt_inputs(
    layout: PolicyLayout, shape: AdaptShape, batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Random inputs of the adapt graph's shapes (tracing, tests)."""
    gen = torch.Generator().manual_seed(seed)
    n, o, a = shape.capacity, layout.obs_dim, layout.act_dim
    return (
        torch.randn(batch, layout.num_weights, generator=gen) * 0.1,
        torch.randn(batch, n, o, generator=gen),
        torch.randn(batch, n, a, generator=gen),
        torch.randn(batch, n, generator=gen),
        (torch.rand(batch, n, generator=gen) < 0.8).to(torch.float32),
        torch.full((batch, 1), 0.1),
    )


def export_policy_graph(
    layout: PolicyLayout, spec: FamilySpec, path: Path, opset: int = DEFAULT_OPSET
) -> Path:
    """Write ``maml_policy`` to ``path`` (dynamic batch) and check it."""
    module = MAMLPolicyGraph(layout, spec).eval()
    example = (
        torch.zeros(2, layout.obs_dim),
        torch.zeros(2, layout.num_weights),
        torch.zeros(2, layout.act_dim),
    )
    _export(module, example, POLICY_INPUTS, POLICY_OUTPUTS, path, opset)
    return path


def trace_adapt(settings: AdaptSettings, shape: AdaptShape) -> torch.fx.GraphModule:
    """The adapt function traced into explicit forward and backward aten ops."""
    table = get_decompositions([torch.ops.aten.tanh_backward])
    example = example_adapt_inputs(settings.layout, shape, batch=shape.batch)
    module = make_fx(adapt_function(settings), decomposition_table=table)(*example)
    return _drop_constant_copies(module)


def _drop_constant_copies(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Rewrite the two traced ops the TorchScript exporter lacks into ones it has: constants
    built inside the function (``torch.from_numpy``) come as ``lift_fresh_copy(constant)``
    (the copy is not needed), autograd emits ``_unsafe_view`` (a ``view``), and a dtype cast
    comes as ``_to_copy`` (``Tensor.to``, which the exporter writes as a Cast)."""
    aten = torch.ops.aten
    for node in list(module.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.lift_fresh_copy.default:
            node.replace_all_uses_with(node.args[0])
            module.graph.erase_node(node)
        elif node.target == aten._unsafe_view.default:
            node.target = aten.view.default
        elif node.target == aten._to_copy.default:
            node.target = _cast

    module.recompile()
    return module


def export_adapt_graph(
    settings: AdaptSettings, shape: AdaptShape, path: Path, opset: int = DEFAULT_OPSET
) -> Path:
    """Write ``maml_adapt`` for a buffer of ``shape`` to ``path`` and check it."""
    if shape.horizon != settings.horizon:
        raise ValueError(f"buffer horizon {shape.horizon} != settings horizon {settings.horizon}")
    module = trace_adapt(settings, shape)
    example = example_adapt_inputs(settings.layout, shape, batch=shape.batch)
    _export(module, example, ADAPT_INPUTS, ADAPT_OUTPUTS, path, opset, dynamic=False)
    return path


def _cast(tensor: torch.Tensor, dtype: torch.dtype, **_: object) -> torch.Tensor:
    return tensor.to(dtype)


def _export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    path: Path,
    opset: int,
    dynamic: bool = True,
) -> None:
    export_module(module, example, inputs, outputs, path, opset, dynamic)
