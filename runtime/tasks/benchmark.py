"""Throughput of the vectorized task families (env-steps per second), for ``edgeadapt bench envs``.

One repeat = ``steps`` batched steps of ``batch`` environments with pre-drawn uniform random
actions, resetting (new episode, same tasks) whenever the horizon is reached; the reset cost is
included. The reported figure is the median over repeats, after one untimed warm-up repeat.
numpy's element-wise kernels are single-threaded, so this measures one core.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import numpy as np

from runtime.tasks.registry import make_family


@dataclass
class EnvBench:
    """Result for one family; rates in env-steps per second."""

    env: str
    split: str
    batch: int
    steps: int
    repeats: int
    env_steps_per_s: float
    runs_env_steps_per_s: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def bench_family(
    name: str, batch: int, steps: int, repeats: int, split: str = "train", seed: int = 0
) -> EnvBench:
    """Median env-steps/s of ``name`` on tasks of ``split`` over ``repeats`` timed repeats."""
    rng = np.random.default_rng(seed)
    env = make_family(name, batch)
    spec = env.spec
    tasks = env.sample_tasks(split, batch, rng)
    actions = rng.uniform(spec.act_low, spec.act_high, size=(steps, batch, spec.act_dim))
    _run(env, tasks, actions, rng)  # warm-up
    rates = [batch * steps / _run(env, tasks, actions, rng) for _ in range(repeats)]
    return EnvBench(name, split, batch, steps, repeats, statistics.median(rates), rates)


def _run(env, tasks: np.ndarray, actions: np.ndarray, rng: np.random.Generator) -> float:
    """Seconds to advance ``len(actions)`` batched steps, resets included."""
    start = time.perf_counter()
    env.reset(tasks, rng)
    for action in actions:
        if env.step(action).truncated[0]:
            env.reset(tasks, rng)
    return time.perf_counter() - start
