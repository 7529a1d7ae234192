"""Rollout collection for every family, in-process or on Ray actors, with the same numbers.

The seam every family shares: a module-level *shard function*
``fn(cfg, weights, job, cache) -> result`` that is pure. The policy weights (put once per
collection into Ray's object store, or passed by reference in-process) and a job (the rows of the
task batch it flies, their tasks, a seed) come in; episodes go out. Its only state is a
:class:`WorkerCache` of environments and network skeletons, into which the weights are loaded on
every call, so a worker holds nothing it could diverge on and a dead one is simply replaced.

A collection call is split into ``pool.workers`` shards (:func:`shard_jobs`). With one shard
(in-process, or Ray with one worker) the shard carries the learner's own generator states
(:class:`RngCarry`) and hands them back advanced (:func:`collect_shards`), so the numbers are
those of a loop in the learner's process: a seed gives the same run as before the seam existed,
with or without Ray. With W > 1 shards each draws its own RNG stream (:func:`shard_generators`)
from one seed the learner draws from its RNG: the numbers depend on W, never on which machine
ran a shard or how often a shard had to be re-collected.

Ray itself lives in :mod:`training.ray_pool`, imported only when ``ray.address`` is set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from runtime.plugins import import_plugins
from runtime.tasks import TaskFamily, make_family

T = TypeVar("T")

#: ``fn(cfg, weights, job, cache) -> result``: a module-level function (Ray ships it by name).
ShardFn = Callable[[Any, Any, Any, "WorkerCache"], Any]


@dataclass(frozen=True)
class RngCarry:
    """The learner's generator states, lent to the only shard of a call and handed back."""

    numpy: dict[str, Any]  # numpy bit_generator.state
    torch: np.ndarray | None  # uint8 torch.Generator state; None: the shard draws no torch RNG


@dataclass(frozen=True)
class ShardJob:
    """One shard of a collection call: batch rows ``rows`` of ``tasks`` with its own seed."""

    rows: np.ndarray  # (n,) int, indices into the call's task batch (and per-task weights)
    tasks: np.ndarray  # (n, K) the tasks of those rows
    seed: int  # the call's seed (drawn by the learner)
    index: int  # shard number: the RNG stream is (seed, index)
    episodes: int = 1  # episodes per task (families that need it)
    mode: str = ""  # family-specific collection mode (PEARL: "prior" or "online")
    carry: RngCarry | None = None  # one shard only: the learner's generators, continued


class RolloutPool(Protocol):
    """Where shards run: :class:`InProcessPool` or :class:`training.ray_pool.RayPool`."""

    workers: int

    def put(self, weights: Any) -> Any:
        """Make ``weights`` available to every worker (Ray: once into the object store)."""
        ...

    def map(self, fn: ShardFn, cfg: Any, weights: Any, jobs: list[ShardJob]) -> list[Any]:
        """Run ``fn`` on every job; results in job order."""
        ...

    def close(self) -> None: ...


class WorkerCache:
    """What a worker keeps between calls: environments and network skeletons (never weights
    it could act on without being sent them again)."""

    def __init__(self) -> None:
        self._envs: dict[tuple[str, int], TaskFamily] = {}
        self._modules: dict[Any, Any] = {}

    def env(self, cfg: Any, batch: int) -> TaskFamily:
        """A batch of ``batch`` environments of the run's family (plugins imported first)."""
        key = (cfg.env.name, batch)
        if key not in self._envs:
            import_plugins(cfg.env.plugins)
            self._envs[key] = make_family(cfg.env.name, batch)
        return self._envs[key]

    def module(self, key: Any, build: Callable[[], T]) -> T:
        """A network skeleton built once; torch's global RNG is left untouched, so building
        one in the learner's process changes none of the learner's numbers."""
        if key not in self._modules:
            with torch.random.fork_rng(devices=[]):
                self._modules[key] = build()
        return self._modules[key]


class InProcessPool:
    """The embedded default: one shard, run in the learner's process."""

    workers = 1

    def __init__(self) -> None:
        self.cache = WorkerCache()

    def put(self, weights: Any) -> Any:
        return weights

    def map(self, fn: ShardFn, cfg: Any, weights: Any, jobs: list[ShardJob]) -> list[Any]:
        return [fn(cfg, weights, job, self.cache) for job in jobs]

    def close(self) -> None:
        return None


def open_pool(cfg: Any) -> RolloutPool:
    """The run's pool: in-process unless ``cfg.ray.address`` is set (then Ray actors)."""
    if cfg.ray.address is None:
        return InProcessPool()
    from training.ray_pool import RayPool

    return RayPool(cfg.ray, num_threads=cfg.train.num_threads)


def shard_jobs(
    pool: RolloutPool,
    tasks: np.ndarray,
    rng: np.random.Generator,
    episodes: int = 1,
    mode: str = "",
    torch_gen: torch.Generator | None = None,
) -> list[ShardJob]:
    """Split one collection call over ``pool.workers`` shards (contiguous rows). One shard
    carries the learner's ``rng`` and ``torch_gen`` states; several draw the call's seed from
    ``rng`` (so it is checkpointed with it)."""
    if pool.workers == 1:
        state = None if torch_gen is None else torch_gen.get_state().numpy()
        carry = RngCarry(rng.bit_generator.state, state)
        return [ShardJob(np.arange(len(tasks)), tasks, 0, 0, episodes, mode, carry)]
    seed = int(rng.integers(2**63 - 1))
    parts = np.array_split(np.arange(len(tasks)), min(pool.workers, len(tasks)))
    return [ShardJob(rows, tasks[rows], seed, i, episodes, mode) for i, rows in enumerate(parts)]


def shard_generators(job: ShardJob) -> tuple[np.random.Generator, torch.Generator]:
    """The shard's numpy (resets, noise) and torch (action sampling) generators."""
    global _ACTIVE
    if job.carry is not None:
        rng = np.random.default_rng()
        rng.bit_generator.state = job.carry.numpy
        gen = torch.Generator()
        if job.carry.torch is not None:
            gen.set_state(torch.from_numpy(job.carry.torch))
        _ACTIVE = (rng, gen)
        return rng, gen
    np_seq, torch_seq = np.random.SeedSequence([job.seed, job.index]).spawn(2)
    torch_seed = int(torch_seq.generate_state(1, np.uint64)[0] >> np.uint64(1))
    return np.random.default_rng(np_seq), torch.Generator().manual_seed(torch_seed)


#: The generators of the carried shard now running in this process (read back by
#: :func:`_carrying`; a worker runs one shard at a time).
_ACTIVE: tuple[np.random.Generator, torch.Generator] | None = None


def _carrying(fn: ShardFn, cfg: Any, weights: Any, job: ShardJob, cache: WorkerCache) -> Any:
    """Run a carried shard; return its result and its generators' end states."""
    global _ACTIVE
    _ACTIVE = None
    result = fn(cfg, weights, job, cache)
    if _ACTIVE is None:
        raise RuntimeError(f"{fn.__name__} did not take its generators from shard_generators()")
    rng, gen = _ACTIVE
    _ACTIVE = None
    return result, rng.bit_generator.state, gen.get_state().numpy()


def collect_shards(
    pool: RolloutPool,
    fn: ShardFn,
    cfg: Any,
    weights: Any,
    tasks: np.ndarray,
    rng: np.random.Generator,
    episodes: int = 1,
    mode: str = "",
    torch_gen: torch.Generator | None = None,
) -> tuple[list[ShardJob], list[Any]]:
    """One collection call: its shards run through ``pool``; (jobs, results) in job order.

    A single shard continues the learner's ``rng`` and ``torch_gen`` (None: the shard draws no
    torch randomness), which are advanced here exactly as a loop in this process would."""
    jobs = shard_jobs(pool, tasks, rng, episodes, mode, torch_gen)
    if jobs[0].carry is None:
        return jobs, pool.map(fn, cfg, weights, jobs)
    [(result, np_state, torch_state)] = pool.map(partial(_carrying, fn), cfg, weights, jobs)
    rng.bit_generator.state = np_state
    if torch_gen is not None:
        torch_gen.set_state(torch.from_numpy(np.array(torch_state)))  # Ray hands back read-only
    return jobs, [result]


def load_weights(module: torch.nn.Module, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Copy a state dict into a cached skeleton (every call: the worker keeps no weights)."""
    module.load_state_dict(weights)
    return module
