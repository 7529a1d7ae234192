"""The torch reference of each graph, and step-graph inputs for parity and test vectors.

Random inputs cover what a device can meet: observations over the family's bounds, actions in
[-1, 1], rewards over a wide range, beliefs from the prior to very confident (precision up to
1e4 per dimension; for full beliefs, random covariances with eigenvalues 1e-4 to the prior's),
forgetting factors in [0.5, 1], and ~2% of transitions with a NaN or inf.
Recorded inputs come from the runtime itself during rollouts (see :mod:`export.calibrate`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from export.graphs import ActGraph, Dims, EncoderGraph, step_graph
from runtime.errors import CheckpointError
from runtime.tasks.base import FamilySpec
from training.checkpoint import LoadedRun


def dims_of(run: LoadedRun) -> Dims:
    """Graph sizes of a loaded run."""
    spec, model = run.family.spec, run.config.model
    return Dims(
        spec.obs_dim,
        spec.act_dim,
        model.latent_dim,
        model.factor_rank,
        model.factor_diagonal,
        model.prior_var,
    )


def reference_modules(run: LoadedRun) -> dict[str, torch.nn.Module]:
    """Torch modules of the three graphs, sharing the run's networks (eval mode)."""
    if run.nets.encoder is None:
        raise CheckpointError(
            f"{run.run_dir}: oracle runs cannot be exported: the oracle's policy reads the true "
            "task vector, which a deployed device does not have"
        )
    spec = run.family.spec
    mods: dict[str, torch.nn.Module] = {
        "step": step_graph(run.nets.encoder, run.nets.actor, spec, run.config.model.prior_var),
        "encoder": EncoderGraph(run.nets.encoder),
        "act": ActGraph(run.nets.actor, spec, run.nets.encoder.rank > 0),
    }
    return {k: m.eval() for k, m in mods.items()}


@torch.no_grad()
def torch_step(
    module: torch.nn.Module, inputs: dict[str, np.ndarray], dims: Any
) -> dict[str, np.ndarray]:
    """Run the torch step graph on numpy inputs (any batch size), outputs by name."""
    names_in, names_out = dims.graph_io("step")
    args = [torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names_in]
    outs = module(*args)
    return {name: t.numpy() for name, t in zip(names_out, outs, strict=True)}


def random_step_inputs(
    dims: Dims,
    spec: FamilySpec,
    n: int,
    rng: np.random.Generator,
    prior_var: float = 1.0,
    nonfinite_share: float = 0.02,
) -> dict[str, np.ndarray]:
    """``n`` random rows of step-graph inputs (deterministic in ``rng``); a share
    ``nonfinite_share`` of the transitions get one NaN or inf entry."""
    low, high = _finite_bounds(spec)
    obs = rng.uniform(low, high, size=(n, dims.obs))
    nxt = np.clip(obs + rng.normal(0.0, 0.1, size=obs.shape) * (high - low), low, high)
    act = rng.uniform(-1.0, 1.0, size=(n, dims.act))
    reward = rng.normal(0.0, 2.0, size=(n, 1))
    transition = np.concatenate([obs, act, reward, nxt], axis=1)
    # Some rows carry a NaN or inf somewhere: the graph must flag them (updated False).
    bad = rng.random(n) < nonfinite_share
    cols = rng.integers(0, transition.shape[1], size=n)
    transition[bad, cols[bad]] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
    z = dims.latent
    forget = np.where(rng.random((n, 1)) < 0.5, 1.0, rng.uniform(0.5, 1.0, (n, 1)))
    if dims.full:  # random rotations of random variances: cov = Q diag(v) Q^T
        q = np.linalg.qr(rng.normal(size=(n, z, z)))[0]
        v = prior_var * np.exp(rng.uniform(np.log(1e-4), 0.0, (n, z)))
        belief = {"cov": (q * v[:, None, :]) @ np.swapaxes(q, -1, -2)}
        belief["mean"] = rng.normal(0.0, 1.5, size=(n, z))
    else:
        precision = 1.0 / prior_var + np.exp(rng.uniform(np.log(1e-3), np.log(1e4), (n, z)))
        belief = {"precision": precision, "eta": rng.normal(0.0, 1.5, size=(n, z)) * precision}
    return {
        "transition": transition.astype(np.float32),
        **{k: v.astype(np.float32) for k, v in belief.items()},
        "forget": forget.astype(np.float32),
        "obs": rng.uniform(low, high, size=(n, dims.obs)).astype(np.float32),
    }


def concat_inputs(*parts: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Row-wise concatenation of several input dicts with the same keys."""
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def take_rows(inputs: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    """The rows ``idx`` of every input."""
    return {k: v[idx] for k, v in inputs.items()}


def _finite_bounds(spec: FamilySpec) -> tuple[np.ndarray, np.ndarray]:
    low = np.where(np.isfinite(spec.obs_low), spec.obs_low, -10.0)
    high = np.where(np.isfinite(spec.obs_high), spec.obs_high, 10.0)
    return low, high
