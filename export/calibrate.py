"""Record the runtime's own step inputs on in-distribution rollouts and calibrate the OOD score.

The exported graph runs in the real runtime :class:`runtime.agent.Agent` through the shared
meta-test protocol; every step-graph call's inputs are recorded. Those recordings give

- the in-distribution surprise scores whose quantiles become the OOD thresholds, and
- "recorded inputs" for the test vectors and the torch-vs-onnxruntime parity check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from runtime.agent import Agent
from runtime.evaluation import held_out_tasks, rollout
from runtime.ood import calibrate_thresholds
from runtime.tasks import make_family

#: Rows per onnxruntime call when a whole recording is run through a graph.
CHUNK_ROWS = 4096
WARN_QUANTILE = 0.99
ALARM_QUANTILE = 0.999


@dataclass
class Recording:
    """Step-graph inputs recorded row by row, and their outputs from the same graph."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray]

    @property
    def rows(self) -> int:
        return len(self.inputs["transition"])

    def surprise_of_updates(self) -> np.ndarray:
        """Surprise scores of the transitions that were absorbed."""
        return self.outputs["surprise"][self.outputs["updated"]]


def record_rollouts(
    agent: Agent, env: str, split: str, tasks: int, episodes: int, seed: int
) -> Recording:
    """Run the protocol on ``tasks`` tasks of ``split`` and record every step-graph call."""
    chunks: list[dict[str, np.ndarray]] = []
    agent.session.set_recorder(lambda ins: chunks.append({k: v.copy() for k, v in ins.items()}))
    try:
        task_set = held_out_tasks(make_family(env, 1), split, tasks, seed)
        rollout(agent, env, task_set, episodes, seed)
    finally:
        agent.session.set_recorder(None)
    inputs = {k: np.concatenate([c[k] for c in chunks], axis=0) for k in chunks[0]}
    return Recording(inputs, run_in_chunks(agent.session.run_feeds, inputs))


def run_in_chunks(
    run: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    feeds: dict[str, np.ndarray],
    rows: int = CHUNK_ROWS,
) -> dict[str, np.ndarray]:
    """``run(feeds)`` over at most ``rows`` rows at a time, outputs concatenated: a graph with
    a large state (MAML's weights, 18 KB a row) on 100k recorded rows would otherwise need
    several GB for its intermediate tensors."""
    n = len(next(iter(feeds.values())))
    parts = [run({k: v[i : i + rows] for k, v in feeds.items()}) for i in range(0, n, rows)]
    return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}


def tasks_within(budget_bytes: int, row_bytes: int, rows_per_task: int, most: int) -> int:
    """How many tasks (at most ``most``, at least 1) a recording may hold within a budget."""
    return int(np.clip(budget_bytes // max(1, row_bytes * rows_per_task), 1, most))


def ood_thresholds(recording: Recording) -> dict[str, object]:
    """Warn/alarm thresholds and a summary of the calibration scores."""
    scores = recording.surprise_of_updates()
    thr = calibrate_thresholds(scores, WARN_QUANTILE, ALARM_QUANTILE)
    return {
        **thr,
        "warn_quantile": WARN_QUANTILE,
        "alarm_quantile": ALARM_QUANTILE,
        "calibration": {
            "transitions": int(scores.size),
            "median": float(np.median(scores)),
            "p99": float(np.quantile(scores, 0.99)),
            "max": float(scores.max()),
        },
    }
