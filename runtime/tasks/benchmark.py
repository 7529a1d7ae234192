"""Throughput of the vectorized task families (env-steps per second), for ``edgeadapt bench envs``.

One repeat = ``steps`` batched steps of ``batch`` environments with pre-drawn uniform random
actions, resetting (new episode, same tasks) whenever the horizon is reached; the reset cost is
included. The reported figure is the median over repeats, after one untimed warm-up repeat.
numpy's element-wise kernels are single-threaded, so this measures one core.

Families simulated by MuJoCo are slower per step: they set ``BENCH_SIZE`` (batch, steps,
repeats), used unless the command line gives sizes, and ``bench_variants(batch)``, other ways
to run the same family (a raw ``mj_step`` loop, a plain gymnasium loop), timed the same way and
reported beside it under ``variants``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field

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
    #: How the family's batch is stepped (its own description), when it says.
    path: str = ""
    #: Other ways to run the same family -> median env-steps/s (same tasks, actions, sizes).
    variants: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


DEFAULT_SIZE = (256, 500, 5)


def bench_family(
    name: str,
    batch: int | None,
    steps: int | None,
    repeats: int | None,
    split: str = "train",
    seed: int = 0,
) -> EnvBench:
    """Median env-steps/s of ``name`` on tasks of ``split`` over ``repeats`` timed repeats;
    a size left None is the family's ``BENCH_SIZE`` (else 256 envs, 500 steps, 5 repeats)."""
    env = make_family(name, 1)
    default = getattr(env, "BENCH_SIZE", DEFAULT_SIZE)
    batch, steps, repeats = (
        v if v is not None else d for v, d in zip((batch, steps, repeats), default, strict=True)
    )
    env = make_family(name, batch)
    rng = np.random.default_rng(seed)
    spec = env.spec
    tasks = env.sample_tasks(split, batch, rng)
    actions = rng.uniform(spec.act_low, spec.act_high, size=(steps, batch, spec.act_dim))
    rates = _rates(env, tasks, actions, repeats, seed)
    variants = getattr(env, "bench_variants", lambda n: {})(batch)
    others = {
        k: statistics.median(_rates(v, tasks, actions, repeats, seed)) for k, v in variants.items()
    }
    path = getattr(env, "bench_path", "")
    return EnvBench(
        name, split, batch, steps, repeats, statistics.median(rates), rates, path, others
    )


def _rates(env, tasks: np.ndarray, actions: np.ndarray, repeats: int, seed: int) -> list[float]:
    """env-steps/s of each timed repeat, after one untimed warm-up repeat."""
    rng = np.random.default_rng(seed + 1)
    batch, steps = actions.shape[1], actions.shape[0]
    _run(env, tasks, actions, rng)  # warm-up
    return [batch * steps / _run(env, tasks, actions, rng) for _ in range(repeats)]


def _run(env, tasks: np.ndarray, actions: np.ndarray, rng: np.random.Generator) -> float:
    """Seconds to advance ``len(actions)`` batched steps, resets included."""
    start = time.perf_counter()
    env.reset(tasks, rng)
    for action in actions:
        if env.step(action).truncated[0]:
            env.reset(tasks, rng)
    return time.perf_counter() - start
