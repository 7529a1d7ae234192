"""RL²'s ONNX graphs: a fused step graph and an act graph, and their torch-vs-onnxruntime parity.

The adaptation state is the GRU hidden state ``h`` (B, H); its declared initial value is zeros
(a new task). Both graphs are stateless (``h`` goes in and comes out) with a dynamic batch axis.

- ``step``: (transition, done, h, obs) -> (action, action_norm, h_out, surprise, updated).
  Scores the transition under ``h`` *before* absorbing it (surprise, ~1 in distribution),
  absorbs it (``h_out = GRU(h, embed(transition, done))``) and returns the deterministic action
  for ``obs`` under ``h_out``, normalized and scaled to the action bounds. ``updated`` is False
  for a row whose transition, done flag or ``h_out`` is not finite: the runtime then keeps that
  row's ``h`` and discards its action.
- ``act``: (obs, h) -> (action, action_norm) without absorbing anything (the first step of a
  trial, at ``h`` = zeros).

The GRU cell is written with Linear layers (:class:`training.rl2_networks.GRUCell`), so the
graphs hold plain MatMul/Sigmoid/Tanh nodes and no ONNX GRU op.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from export.graphs import BATCH, ActionScale
from export.onnx_export import DEFAULT_OPSET, export_module
from runtime.tasks.base import FamilySpec
from runtime.transition import transition_dim
from training.rl2_networks import RL2Agent

STEP_INPUTS = ("transition", "done", "h", "obs")
STEP_OUTPUTS = ("action", "action_norm", "h_out", "surprise", "updated")
ACT_INPUTS = ("obs", "h")
ACT_OUTPUTS = ("action", "action_norm")
PARITY_TARGET = 1e-5
# The surprise is a squared prediction *residual* divided by its small training scale: when the
# auxiliary head predicts well, the residual is a few percent of the predicted value, so the
# float32 rounding differences of the prediction (torch vs onnxruntime sum in different
# orders) are amplified ~50x. Measured on a trained point-nav agent: median relative error
# 3.5e-5 on recorded rows; irrelevant for OOD thresholds (ood scores are 100x the in-distribution
# ones) but above 1e-5, so the surprise has its own, relative target.
SURPRISE_PARITY_TARGET = 1e-4


class RL2StepGraph(nn.Module):
    """Fused step: surprise of the transition under ``h``, ``h_out``, action for ``obs``."""

    def __init__(self, agent: RL2Agent, spec: FamilySpec) -> None:
        super().__init__()
        self.agent = agent
        self.scale = ActionScale(spec)

    def forward(
        self,
        transition: torch.Tensor,
        done: torch.Tensor,
        h: torch.Tensor,
        obs: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        surprise = self.agent.surprise(transition, h)
        h_out = self.agent.absorb(transition, done, h)
        action_norm = self.agent.act_mean(obs, h_out).clamp(-1.0, 1.0)  # ORT Tanh overshoot
        # NaN for any NaN/inf in the row, else exactly 0 (see export.graphs.StepGraph).
        check = (torch.cat([transition, done, h_out], dim=-1) * 0.0).sum(dim=-1)
        updated = check == 0.0
        return self.scale(action_norm), action_norm, h_out, surprise, updated


class RL2ActGraph(nn.Module):
    """(obs, h) -> deterministic action under ``h`` (scaled, normalized)."""

    def __init__(self, agent: RL2Agent, spec: FamilySpec) -> None:
        super().__init__()
        self.agent = agent
        self.scale = ActionScale(spec)

    def forward(self, obs: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        action_norm = self.agent.act_mean(obs, h).clamp(-1.0, 1.0)  # ORT Tanh overshoot
        return self.scale(action_norm), action_norm


@dataclass(frozen=True)
class RL2Dims:
    """Sizes the RL² graphs are built for."""

    obs: int
    act: int
    hidden: int

    @property
    def transition(self) -> int:
        return transition_dim(self.obs, self.act)


def rl2_dims(agent: RL2Agent) -> RL2Dims:
    return RL2Dims(agent.obs_dim, agent.act_dim, agent.hidden_size)


def tensor_shapes(dims: RL2Dims) -> dict[str, tuple[list[int | str], str]]:
    """Name -> (shape with ``"batch"`` for the dynamic axis, dtype) of every RL² graph I/O."""
    b = BATCH
    return {
        "transition": ([b, dims.transition], "float32"),
        "done": ([b, 1], "float32"),
        "h": ([b, dims.hidden], "float32"),
        "obs": ([b, dims.obs], "float32"),
        "action": ([b, dims.act], "float32"),
        "action_norm": ([b, dims.act], "float32"),
        "h_out": ([b, dims.hidden], "float32"),
        "surprise": ([b], "float32"),
        "updated": ([b], "bool"),
    }


def graph_io(graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Input and output names of ``graph`` ("step" or "act")."""
    if graph == "step":
        return STEP_INPUTS, STEP_OUTPUTS
    if graph == "act":
        return ACT_INPUTS, ACT_OUTPUTS
    raise ValueError(f"unknown RL² graph {graph!r}; expected 'step' or 'act'")


def example_inputs(graph: str, dims: RL2Dims, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Dummy float32 inputs used to trace ``graph`` (shapes matter, values do not)."""
    shapes = tensor_shapes(dims)
    return tuple(
        torch.ones([batch if s == BATCH else int(s) for s in shapes[n][0]])
        for n in graph_io(graph)[0]
    )


def export_rl2_graphs(
    agent: RL2Agent, spec: FamilySpec, out_dir: Path, opset: int = DEFAULT_OPSET
) -> dict[str, Path]:
    """Export ``step.onnx`` and ``act.onnx`` into ``out_dir`` and run the ONNX checker.

    Same exporter settings as :func:`export.onnx_export.export_graph` (legacy TorchScript
    exporter, dynamic batch axis, constant folding), which is tied to PEARL's I/O names.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    modules = {"step": RL2StepGraph(agent, spec), "act": RL2ActGraph(agent, spec)}
    paths = {}
    for graph, module in modules.items():
        paths[graph] = out_dir / f"{graph}.onnx"
        _export(module.eval(), graph, rl2_dims(agent), paths[graph], opset)
    return paths


def _export(module: nn.Module, graph: str, dims: RL2Dims, path: Path, opset: int) -> None:
    inputs, outputs = graph_io(graph)
    export_module(module, example_inputs(graph, dims), inputs, outputs, path, opset)


# -- parity ---------------------------------------------------------------------------------
def random_step_inputs(
    agent: RL2Agent, rows: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Step-graph inputs spread around the agent's input statistics: obs and next_obs within
    3 std of the training mean, actions in [-1, 1], rewards within 3 std, random done flags,
    hidden states uniform in (-1, 1) (a GRU state's range)."""

    def around(mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
        m, s = mean.numpy(), std.numpy()
        return (m + s * rng.uniform(-3.0, 3.0, size=(rows, len(m)))).astype(np.float32)

    obs = around(agent.obs_mean, agent.obs_std)
    action = rng.uniform(-1.0, 1.0, size=(rows, agent.act_dim)).astype(np.float32)
    reward = around(agent.rew_mean, agent.rew_std)
    next_obs = around(agent.obs_mean, agent.obs_std)
    return {
        "transition": np.concatenate([obs, action, reward, next_obs], axis=1),
        "done": (rng.random((rows, 1)) < 0.1).astype(np.float32),
        "h": rng.uniform(-1.0, 1.0, size=(rows, agent.hidden_size)).astype(np.float32),
        "obs": around(agent.obs_mean, agent.obs_std),
    }


def parity(
    module: nn.Module, path: Path, inputs: dict[str, np.ndarray], chunk: int = 4096
) -> dict[str, float]:
    """Max error per output, torch vs onnxruntime on ``inputs``: ``|ort - torch| /
    max(1, |torch|)`` (absolute for values up to 1, as in ``edgeadapt verify``); booleans count
    mismatches."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    worst = dict.fromkeys(names, 0.0)
    rows = len(next(iter(inputs.values())))
    for start in range(0, rows, chunk):
        feed = {k: v[start : start + chunk] for k, v in inputs.items()}
        got = session.run(names, feed)
        with torch.no_grad():
            want = module.eval()(*(torch.from_numpy(feed[n]) for n in feed))
        for name, g, w in zip(names, got, want, strict=True):
            w = w.numpy()
            if w.dtype == bool:
                err = float(np.sum(g != w))
            else:
                err = float(np.max(np.abs(g - w) / np.maximum(1.0, np.abs(w)), initial=0.0))
            worst[name] = max(worst[name], err)
    return worst


def recorded_step_inputs(
    agent: RL2Agent, spec: FamilySpec, env_name: str, tasks: np.ndarray, episodes: int, seed: int
) -> dict[str, np.ndarray]:
    """Step-graph inputs recorded from deterministic rollouts of the agent on ``tasks``."""
    from runtime.evaluation import rollout
    from training.rl2_policy import RL2Policy

    rec: dict[str, list[np.ndarray]] = {n: [] for n in STEP_INPUTS}

    class Recorder(RL2Policy):
        def observe(self, obs_BO, action_BA, reward_B, next_obs_BO, done=False):  # type: ignore[override]
            h = self.h.numpy().copy()
            steps = self.steps + 1
            flag = (np.asarray(done, dtype=bool) | (steps >= self.spec.horizon)).astype(np.float32)
            rec["transition"].append(
                np.concatenate(
                    [obs_BO, action_BA, np.reshape(reward_B, (-1, 1)), next_obs_BO], axis=1
                ).astype(np.float32)
            )
            rec["done"].append(np.broadcast_to(flag, (len(h),))[:, None].copy())
            rec["h"].append(h)
            rec["obs"].append(np.asarray(next_obs_BO, dtype=np.float32))
            super().observe(obs_BO, action_BA, reward_B, next_obs_BO, done)

    rollout(Recorder(agent, spec), env_name, tasks, episodes, seed)
    return {k: np.concatenate(v) for k, v in rec.items()}


def check_parity(
    agent: RL2Agent,
    spec: FamilySpec,
    paths: dict[str, Path],
    env_name: str,
    tasks: np.ndarray,
    rows: int = 10_000,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Parity of both graphs on ``rows`` random inputs and on rollout-recorded inputs.

    Returns ``{"step_random": {...}, "step_recorded": {...}, "act_random": {...},
    "act_recorded": {...}}``, each the max error per output (see :func:`parity`).
    """
    rng = np.random.default_rng(seed)
    step, act = RL2StepGraph(agent, spec), RL2ActGraph(agent, spec)
    rand = random_step_inputs(agent, rows, rng)
    recorded = recorded_step_inputs(agent, spec, env_name, tasks, episodes=2, seed=seed)
    out = {}
    for label, inputs in (("random", rand), ("recorded", recorded)):
        out[f"step_{label}"] = parity(step, paths["step"], inputs)
        act_inputs = {"obs": inputs["obs"], "h": inputs["h"]}
        out[f"act_{label}"] = parity(act, paths["act"], act_inputs)
    return out


def parity_failures(result: dict[str, dict[str, float]]) -> list[str]:
    """The outputs of a :func:`check_parity` result that miss their target (empty: all pass)."""
    bad = []
    for label, errs in result.items():
        for name, err in errs.items():
            target = SURPRISE_PARITY_TARGET if name == "surprise" else PARITY_TARGET
            if err > target:  # "updated" counts mismatches: any is a failure
                bad.append(f"{label}.{name}: {err:.2e} > {target:.0e}")
    return bad
