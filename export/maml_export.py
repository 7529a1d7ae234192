"""MAML's export declaration (see :mod:`export.family`): gradient adaptation on the device.

State: ``weights`` (W,), the policy's flat weight vector, initialized from ``theta.npy`` (the
meta-learned weights). Graphs:

- ``step``: ``(transition, obs, noise, weights) -> (action, action_norm, action_raw,
  weights_out, surprise, updated)``: the Gaussian policy under the current weights (the weights
  pass through unchanged: MAML absorbs a transition by buffering it, not by a state update);
- ``act``: ``(obs, weights, noise) -> (action, action_norm, action_raw)``;
- ``adapt``: the inner policy-gradient step, static batch 1 (:mod:`export.maml_graphs`).

The episodic declaration tells the runtime to buffer ``(obs, action_raw, reward)`` of each
step, and after ``episodes_per_step`` episodes run ``adapt`` once (MAML's one-step meta-test);
the noise declaration makes it draw the exploration noise until then.

``surprise`` here is the novelty of a transition under the meta-training statistics (squared
standardized reward and observation change, averaged): MAML has no task model, so it flags
transitions unlike anything seen in meta-training (a storm), not a changed task within range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from export.graphs import BATCH
from export.maml_graphs import (
    ADAPT_INPUTS,
    ADAPT_OUTPUTS,
    AdaptShape,
    MAMLPolicyGraph,
    export_adapt_graph,
)
from export.onnx_export import export_graph as export_generic
from export.onnx_export import graph_spec
from runtime.adaptation import (
    BufferField,
    EpisodicSpec,
    GenericAdaptation,
    NoiseSpec,
    ParamSpec,
    StateSpec,
)
from runtime.evaluation import held_out_tasks
from runtime.tasks import make_family
from runtime.tasks.base import FamilySpec
from training.maml_family import ADAPTATIONS
from training.maml_networks import policy_mean

PARITY_TARGET = 1e-5
INT8_UNSUPPORTED = (
    "the policy weights are an input of the step graph (the fast weights), so there are no"
    " constant weights to quantize"
)
#: The adapt graph's parity is checked on its own (tests/test_maml.py, 8e-8) and end to end
#: by the contract suite (torch vs onnxruntime returns through an adaptation); verify --run
#: checks the step and act graphs (the modules below).
THETA_FILE = "theta.npy"
STEP_IO = (
    ("transition", "obs", "noise", "weights"),
    ("action", "action_norm", "action_raw", "weights_out", "surprise", "updated"),
)
ACT_IO = (("obs", "weights", "noise"), ("action", "action_norm", "action_raw"))


class MAMLStepGraph(nn.Module):
    """The contract's step graph for MAML (see the module docstring).

    Written for few nodes (each costs ~0.5-1 µs at batch 1 in onnxruntime): the reward and
    the observation change are picked out of the transition row by one MatMul with a 0/±1
    matrix (exact: each output is one difference), then standardized by one Add and one Mul
    (scaled by ``1 / sqrt(1 + O)``, so ``surprise = sum(z²)``); ``updated`` checks the
    transition row only (the weights do not change in a step: the adapt path checks them).
    """

    def __init__(self, policy: MAMLPolicyGraph, stats: dict[str, np.ndarray]) -> None:
        super().__init__()
        self.policy = policy
        self.obs_dim = policy.layout.obs_dim
        self.act_dim = policy.layout.act_dim
        pick, offset, scale = surprise_map(self.obs_dim, self.act_dim, stats)
        self.register_buffer("surprise_pick", torch.as_tensor(pick))
        self.register_buffer("surprise_offset", torch.as_tensor(offset))
        self.register_buffer("surprise_scale", torch.as_tensor(scale))

    def forward(
        self, transition: torch.Tensor, obs: torch.Tensor, noise: torch.Tensor, w: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        picked = torch.matmul(transition, self.surprise_pick)  # (B, 1 + O): r, next - prev
        z = (picked + self.surprise_offset) * self.surprise_scale
        surprise = (z * z).sum(dim=-1)
        action, norm, raw = self.policy(obs, w, noise)
        updated = (transition * 0.0).sum(dim=-1) == 0.0  # False for NaN/inf anywhere in it
        return action, norm, raw, w + 0.0, surprise, updated


def surprise_map(
    obs_dim: int, act_dim: int, stats: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(P, c, s)`` with ``(x P + c) s = [z_r, z_d] / sqrt(1 + O)`` for a transition row
    ``x = (obs, action, reward, next_obs)``: ``z_r = (r - reward_mean) / reward_std``,
    ``z_d = (next_obs - obs - delta_mean) / delta_std``. ``P`` ``(2 O + A + 1, 1 + O)`` has
    entries 0 and ±1 only. Float32."""
    o, a = obs_dim, act_dim
    pick = np.zeros((2 * o + a + 1, 1 + o), np.float32)
    pick[o + a, 0] = 1.0
    for i in range(o):
        pick[i, 1 + i], pick[o + a + 1 + i, 1 + i] = -1.0, 1.0
    mean = np.concatenate([[float(stats["reward_mean"])], np.asarray(stats["delta_mean"])])
    std = np.concatenate([[float(stats["reward_std"])], np.asarray(stats["delta_std"])])
    scale = 1.0 / (std * np.sqrt(1.0 + o))
    return pick, (-mean).astype(np.float32), scale.astype(np.float32)


@dataclass(frozen=True)
class MAMLDims:
    """The graph-signature object (:class:`export.family.GraphDims`) of a MAML run."""

    obs: int
    act: int
    weights: int
    capacity: int
    theta: np.ndarray

    def graph_io(self, graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return {"step": STEP_IO, "act": ACT_IO, "adapt": (ADAPT_INPUTS, ADAPT_OUTPUTS)}[graph]

    def tensor_shapes(self, graph: str) -> dict[str, tuple[list[int | str], str]]:
        if graph == "adapt":
            n, o, a, w = self.capacity, self.obs, self.act, self.weights
            table: dict[str, tuple[list[int | str], str]] = {
                "weights": ([1, w], "float32"), "obs": ([1, n, o], "float32"),
                "action_raw": ([1, n, a], "float32"), "reward": ([1, n], "float32"),
                "mask": ([1, n], "float32"), "inner_lr": ([1, 1], "float32"),
                "weights_out": ([1, w], "float32"), "ok": ([1], "bool"),
                **{k: ([1], "float32") for k in ADAPT_OUTPUTS[2:]},
            }  # fmt: skip
            return table
        b = BATCH
        table = {
            "transition": ([b, 2 * self.obs + self.act + 1], "float32"),
            "obs": ([b, self.obs], "float32"), "noise": ([b, self.act], "float32"),
            "weights": ([b, self.weights], "float32"), "action": ([b, self.act], "float32"),
            "action_norm": ([b, self.act], "float32"), "action_raw": ([b, self.act], "float32"),
            "weights_out": ([b, self.weights], "float32"), "surprise": ([b], "float32"),
            "updated": ([b], "bool"),
        }  # fmt: skip
        ins, outs = self.graph_io(graph)
        return {k: table[k] for k in ins + outs}

    def random_step_inputs(
        self, spec: FamilySpec, n: int, rng: np.random.Generator, nonfinite_share: float = 0.02
    ) -> dict[str, np.ndarray]:
        """Observations over the bounds, rewards over a wide range, weights near theta."""
        low = np.where(np.isfinite(spec.obs_low), spec.obs_low, -10.0)
        high = np.where(np.isfinite(spec.obs_high), spec.obs_high, 10.0)
        obs = rng.uniform(low, high, (n, self.obs))
        nxt = np.clip(obs + rng.normal(0, 0.05, obs.shape) * (high - low), low, high)
        act = rng.uniform(-1, 1, (n, self.act))
        tr = np.concatenate([obs, act, rng.normal(0, 2, (n, 1)), nxt], axis=1)
        bad = rng.random(n) < nonfinite_share
        cols = rng.integers(0, tr.shape[1], size=n)
        tr[bad, cols[bad]] = np.nan
        weights = self.theta[None] + rng.normal(0, 0.05, (n, self.weights))
        return {
            "transition": tr.astype(np.float32),
            "obs": rng.uniform(low, high, (n, self.obs)).astype(np.float32),
            "noise": rng.standard_normal((n, self.act)).astype(np.float32),
            "weights": weights.astype(np.float32),
        }


def dims_of(run: Any) -> MAMLDims:
    state = run.nets
    layout = state.layout
    capacity = state.cfg.maml.episodes_per_step * state.spec.horizon
    theta = state.theta.detach().numpy().astype(np.float32)
    return MAMLDims(layout.obs_dim, layout.act_dim, layout.num_weights, capacity, theta)


def reference_modules(run: Any) -> dict[str, nn.Module]:
    state = run.nets
    policy = MAMLPolicyGraph(state.layout, state.spec).eval()
    return {"step": MAMLStepGraph(policy, transition_stats(run)).eval(), "act": policy}


def export_graphs(run: Any, modules: dict[str, nn.Module], out: Path, opset: int) -> dict:
    """Every graph of the bundle (the adapt graph traced from the inner step, static batch 1)
    plus ``theta.npy`` (the initial weights)."""
    dims = dims_of(run)
    state = run.nets
    graphs = {
        name: export_generic(mod, name, dims, out / f"{name}.onnx", opset)
        for name, mod in modules.items()
    }
    shape = AdaptShape(state.cfg.maml.episodes_per_step, state.spec.horizon, batch=1)
    export_adapt_graph(state.settings, shape, out / "adapt.onnx", opset)
    graphs["adapt"] = graph_spec("adapt", dims, "adapt.onnx")
    np.save(out / THETA_FILE, dims.theta)
    return graphs


def adaptation(run: Any, recording: Any = None) -> GenericAdaptation:
    state = run.nets
    m = state.cfg.maml
    dims = dims_of(run)
    return GenericAdaptation(
        algorithm="maml",
        state=[StateSpec(name="weights", shape=[dims.weights], init=THETA_FILE)],
        params=[
            ParamSpec(
                name="inner_lr", default=state.inner_lr, low=0.0, high=10.0,
                description="step size of the inner policy-gradient step",
            )
        ],
        episodic=EpisodicSpec(
            graph="adapt", horizon=state.spec.horizon, every_episodes=m.episodes_per_step,
            max_adaptations=ADAPTATIONS,
            fields=[
                BufferField(name="obs", source="obs"),
                BufferField(name="action_raw", source="output:action_raw"),
                BufferField(name="reward", source="reward"),
            ],
        ),
        noise=NoiseSpec(input="noise", dim=dims.act),
        summary_names=[f"w{i}" for i in range(8)],  # the default summary: the first weights
        info={"inner_steps": m.inner_steps, "gamma": m.gamma,
              "hidden": [float(h) for h in state.cfg.model.hidden]},
    )  # fmt: skip


@torch.no_grad()
def transition_stats(run: Any, tasks: int = 16, seed: int = 7) -> dict[str, np.ndarray]:
    """Reward and observation-change statistics of the meta-learned mean policy on train tasks
    (what ``surprise`` standardizes by), deterministic in ``seed``."""
    state = run.nets
    spec = state.spec
    env = make_family(spec.name, tasks)
    task_set = held_out_tasks(make_family(spec.name), "train", tasks, seed)
    rng = np.random.default_rng(seed)
    w = state.theta.detach()[None].expand(tasks, -1)
    obs = env.reset(task_set, rng)
    rewards, deltas = [], []
    half = (spec.act_high - spec.act_low) / 2.0
    for _ in range(2 * spec.horizon):
        mean = policy_mean(torch.from_numpy(obs).unsqueeze(1), w, state.layout).squeeze(1)
        a = np.clip(mean.numpy(), -1.0, 1.0)
        res = env.step(spec.act_low + half * (a + 1.0))
        rewards.append(res.reward)
        deltas.append(res.obs - obs)
        obs = env.reset(task_set, rng) if res.truncated.any() else res.obs
    r, d = np.concatenate(rewards), np.concatenate(deltas)
    return {
        "reward_mean": np.float32(r.mean()),
        "reward_std": np.float32(max(r.std(), 1e-3)),
        "delta_mean": d.mean(0).astype(np.float32),
        "delta_std": np.maximum(d.std(0), 1e-3).astype(np.float32),
    }


@torch.no_grad()
def extra_parity(run: Any, bundle_dir: Path, manifest: Any) -> dict[str, float]:
    """``verify --run``'s parity of the adapt graph (onnxruntime) against the torch inner step:
    3 random buffers and one recorded from the meta-test policy's own exploration episodes.
    Errors as in verify (``|ort - torch| / max(1, |torch|)``), per output, worst case."""
    from export.maml_graphs import example_adapt_inputs
    from runtime.providers import CPU
    from runtime.selftest import max_rel_err
    from runtime.session import GraphSession
    from training.maml_inner import adapt

    state = run.nets
    spec = manifest.graph("adapt")
    session = GraphSession(bundle_dir / spec.file, spec, providers=[CPU])
    shape = AdaptShape(state.cfg.maml.episodes_per_step, state.spec.horizon, batch=1)
    theta = state.theta.detach()[None].clone()
    cases = []
    for seed in range(3):
        inputs = list(example_adapt_inputs(state.layout, shape, batch=1, seed=seed))
        inputs[0] = theta
        cases.append(tuple(inputs))
    cases.append(_recorded_buffer(run, theta))
    errors: dict[str, float] = {}
    for inputs in cases:
        got = session.run_feeds(dict(zip(ADAPT_INPUTS, (x.numpy() for x in inputs), strict=True)))
        want = adapt(*inputs, state.settings)
        for name in ADAPT_OUTPUTS:
            if name == "ok":
                continue
            ref = getattr(want, name.removesuffix("_out")).detach().numpy()
            key = f"adapt.{name}"
            errors[key] = max(errors.get(key, 0.0), max_rel_err(got[name], ref))
    return errors


def _recorded_buffer(run: Any, theta: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The exploration episodes of one train task, as the meta-test policy buffers them."""
    from runtime.evaluation import rollout
    from training.maml_family import policy_for

    captured: list[tuple[np.ndarray, ...]] = []
    policy = policy_for(run)
    inner = policy._inner_step

    def capture(buffers: tuple[np.ndarray, ...], lr_B1: np.ndarray) -> dict:
        captured.append((*(b.copy() for b in buffers), lr_B1.copy()))
        return inner(buffers, lr_B1)

    policy._inner_step = capture  # type: ignore[method-assign]
    state = run.nets
    tasks = held_out_tasks(make_family(state.spec.name), "train", 1, seed=5)
    rollout(policy, state.spec.name, tasks, state.cfg.maml.episodes_per_step, seed=5)
    obs, act, rew, mask, lr = captured[0]
    return (theta, *(torch.from_numpy(x) for x in (obs, act, rew, mask, lr)))
