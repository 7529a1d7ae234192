"""RL²'s export declaration (see :mod:`export.family`): a recurrent hidden state.

State: ``h`` (H,), zeros at a new task, kept across the episodes of the task. Graphs: ``step``
(surprise of the transition under ``h``, ``h_out = GRU(h, embed(transition, done))``, action
for ``obs``) and ``act`` (action under ``h``). The telemetry summary is a fixed projection of
``h`` on its top principal components over the calibration rollouts (in-distribution).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from export.rl2_graphs import (
    PARITY_TARGET,
    SURPRISE_PARITY_TARGET,
    RL2ActGraph,
    RL2StepGraph,
    graph_io,
    random_step_inputs,
    tensor_shapes,
)
from runtime.adaptation import RL2Adaptation, StateSpec
from runtime.tasks.base import FamilySpec
from training.rl2_networks import RL2Agent

__all__ = ["OUTPUT_TARGETS", "PARITY_TARGET", "adaptation", "dims_of", "reference_modules"]

#: Per-output parity targets that differ from PARITY_TARGET (see export.rl2_graphs).
OUTPUT_TARGETS = {"surprise": SURPRISE_PARITY_TARGET}
SUMMARY_COMPONENTS = 3


@dataclass(frozen=True)
class RL2ExportDims:
    """The graph-signature object (:class:`export.family.GraphDims`) of an RL² agent."""

    agent: RL2Agent
    obs: int
    act: int
    hidden: int

    @property
    def transition(self) -> int:
        return 2 * self.obs + self.act + 1

    def graph_io(self, graph: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return graph_io(graph)

    def tensor_shapes(self, graph: str) -> dict[str, tuple[list[int | str], str]]:
        ins, outs = graph_io(graph)
        table = tensor_shapes(self)  # type: ignore[arg-type]
        return {n: table[n] for n in ins + outs}

    def random_step_inputs(
        self, spec: FamilySpec, n: int, rng: np.random.Generator, nonfinite_share: float = 0.02
    ) -> dict[str, np.ndarray]:
        inputs = random_step_inputs(self.agent, n, rng)
        tr = inputs["transition"]
        bad = rng.random(n) < nonfinite_share  # the graph must flag these (updated False)
        cols = rng.integers(0, tr.shape[1], size=n)
        tr[bad, cols[bad]] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
        return inputs


def dims_of(run: Any) -> RL2ExportDims:
    agent = run.nets
    return RL2ExportDims(agent, agent.obs_dim, agent.act_dim, agent.hidden_size)


def reference_modules(run: Any) -> dict[str, Any]:
    spec = run.family.spec
    return {
        "step": RL2StepGraph(run.nets, spec).eval(),
        "act": RL2ActGraph(run.nets, spec).eval(),
    }


def adaptation(run: Any, recording: Any = None) -> RL2Adaptation:
    """State ``h`` at zeros; with the calibration ``recording``, the summary projection."""
    hidden = run.nets.hidden_size
    center, basis = _principal_components(recording, hidden)
    return RL2Adaptation(
        state=[StateSpec(name="h", shape=[hidden], init=0.0)],
        hidden_size=hidden,
        summary_names=[f"pc{i + 1}" for i in range(len(basis))],
        summary_center=center,
        summary_basis=basis,
    )


def _principal_components(recording: Any, hidden: int) -> tuple[list[float], list[list[float]]]:
    """Mean and top principal directions of the hidden states the step graph was fed."""
    if recording is None:
        return [], []
    h = np.asarray(recording.inputs["h"], dtype=np.float64)
    h = h[np.isfinite(h).all(axis=1)]
    if len(h) < 2:
        return [], []
    center = h.mean(axis=0)
    _, _, vt = np.linalg.svd(h - center, full_matrices=False)
    k = min(SUMMARY_COMPONENTS, hidden, len(vt))
    return center.astype(float).tolist(), vt[:k].astype(float).tolist()
