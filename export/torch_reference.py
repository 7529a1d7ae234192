"""The bundle's step rebuilt in torch eager from the ONNX weights (for ``bench runtime``).

The legacy exporter keeps parameter names (``encoder.net.0.weight``, ``actor.net.0.weight``,
...), so the torch networks are rebuilt with the same classes and loaded from the graph's
initializers: the comparison is the same model, not a look-alike.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from export.graphs import step_graph
from runtime.bundle import read_manifest
from runtime.tasks import make_family
from training.networks import ContextEncoder, TanhGaussianActor


def step_module_from_bundle(bundle_dir: str | Path) -> torch.nn.Module:
    """A torch step graph carrying the weights of the bundle's ``step.onnx``."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    model = onnx.load(str(bundle_dir / manifest.graph("step").file))
    weights = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in model.graph.initializer
    }
    spec = make_family(manifest.env, 1).spec
    pearl = manifest.adaptation
    o, a, z = manifest.obs.dim, manifest.act.dim, pearl.latent_dim
    encoder = ContextEncoder(
        o,
        a,
        z,
        _hidden(weights, "encoder.net"),
        pearl.min_var,
        pearl.factor_rank,
        pearl.factor_diagonal,
        pearl.factor_var == "shared",
    )
    hidden = _hidden(weights, "actor.net", include_last=True)
    actor = TanhGaussianActor(o, z, a, hidden)
    encoder.load_state_dict(_strip(weights, "encoder."))
    actor_state = _strip(weights, "actor.")
    # The graph keeps only the mean half of the actor's last layer (constant-folded, unnamed):
    # take it from the Gemm that feeds the Tanh; the log-std half does not affect the action.
    w_name, b_name = _mean_head(model)
    last = len(hidden) * 2
    full_w = torch.zeros(2 * a, hidden[-1])
    full_b = torch.zeros(2 * a)
    full_w[:a], full_b[:a] = weights[w_name], weights[b_name]
    actor_state |= {f"net.{last}.weight": full_w, f"net.{last}.bias": full_b}
    actor.load_state_dict(actor_state)
    return step_graph(encoder, actor, spec, pearl.prior_var).eval()


class TorchStepper:
    """Times the torch step (numpy in, numpy out, one thread) along a trajectory: the torch
    analog of one runtime act + observe, for any family (the declared state is fed back by
    name, as the runtime does). Each :meth:`run` call continues where the last ended.

    The step module comes from ``run_dir`` (the run's own networks) when given, else it is
    rebuilt from the bundle's ONNX weights (PEARL bundles only).
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        traj: dict[str, np.ndarray],
        threads: int = 1,
        run_dir: str | Path | None = None,
    ):
        torch.set_num_threads(threads)
        manifest = read_manifest(bundle_dir)
        if run_dir is not None:
            from export.family import family_export
            from training.checkpoint import load_run

            run = load_run(run_dir)
            self.module = family_export(run).reference_modules(run)["step"]
        elif manifest.algorithm == "pearl":
            self.module = step_module_from_bundle(bundle_dir)
        else:
            raise ValueError(f"{manifest.algorithm} bundle: pass the run directory (--run)")
        spec = manifest.graph("step")
        self.inputs = [t.name for t in spec.inputs]
        self.outputs = [t.name for t in spec.outputs]
        ad = manifest.adaptation
        bundle = Path(bundle_dir)
        self.state = {s.name: torch.from_numpy(s.initial(bundle)[None].copy()) for s in ad.state}
        self.fixed = {p.name: torch.full((1, 1), p.default) for p in ad.params}
        self.fixed["done"] = torch.zeros(1, 1)
        if ad.noise is not None:  # the mean action: the runtime's exploration draws are not timed
            self.fixed[ad.noise.input] = torch.zeros(1, ad.noise.dim)
        self.traj = traj
        self.pos = 0
        self.run(200)  # warm-up

    @torch.no_grad()
    def run(self, steps: int) -> np.ndarray:
        """Time ``steps`` more steps (µs each)."""
        traj, n = self.traj, len(self.traj["obs"])
        out = np.empty(steps)
        action = np.zeros(1)
        for i in range(steps):
            j = (self.pos + i) % n
            t0 = time.perf_counter_ns()
            row = np.concatenate([traj["obs"][j], traj["act"][j], traj["rew"][j], traj["next"][j]])
            feeds = {
                "transition": torch.from_numpy(row[None]),
                "obs": torch.from_numpy(traj["next"][j][None]),
                **self.fixed,
                **self.state,
            }
            res = dict(
                zip(self.outputs, self.module(*(feeds[k] for k in self.inputs)), strict=True)
            )
            action = res["action_norm"].numpy()
            self.state = {k: res[k + "_out"] for k in self.state}
            out[i] = time.perf_counter_ns() - t0
        self.pos += steps
        if not np.isfinite(action).all():
            raise RuntimeError("torch reference produced a non-finite action")
        return out / 1e3


def _hidden(
    weights: dict[str, torch.Tensor], prefix: str, include_last: bool = False
) -> tuple[int, ...]:
    """Hidden widths of an ``mlp`` from its Linear weights ``prefix.{0,2,4,...}.weight``
    (``include_last``: the last named Linear is a hidden layer, its head is unnamed)."""
    idx = sorted(
        int(k.split(".")[-2]) for k in weights if k.startswith(prefix) and k.endswith("weight")
    )
    layers = idx if include_last else idx[:-1]
    return tuple(int(weights[f"{prefix}.{i}.weight"].shape[0]) for i in layers)


def _mean_head(model: onnx.ModelProto) -> tuple[str, str]:
    """Weight and bias initializer names of the Gemm whose output goes through Tanh."""
    producers = {out: node for node in model.graph.node for out in node.output}
    for node in model.graph.node:
        if node.op_type == "Tanh":
            gemm = producers[node.input[0]]
            if gemm.op_type == "Gemm":
                return gemm.input[1], gemm.input[2]
    raise ValueError("step graph has no Gemm -> Tanh action head")


def _strip(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
