"""Rollout shards on Ray actors (the ``ray`` extra): a fault-tolerant :class:`RolloutPool`.

Each actor is a :class:`RolloutWorker`: a :class:`training.rollouts.WorkerCache` (environments
and network skeletons) and nothing else. The learner puts the policy weights into the object
store once per collection; every shard call receives them again. A worker that dies (process
killed, node lost) or overruns ``ray.timeout_s`` is killed, replaced by a fresh actor and its
shard re-collected with the same seed, so the episodes are the ones it would have returned.

Only the training side imports this module (and Ray); the device side never does.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from runtime.errors import ConfigError, EdgeadaptError, MissingExtraError
from training.config import RayConfig
from training.rollouts import ShardFn, ShardJob, WorkerCache

log = logging.getLogger(__name__)

#: How often the pool wakes up to check shard deadlines (s).
POLL_S = 1.0


class RolloutError(EdgeadaptError):
    """A shard could not be collected (its workers kept dying)."""


def import_ray() -> Any:
    """``import ray`` with a one-line error naming the extra when it is missing."""
    try:
        import ray
    except ModuleNotFoundError:
        raise MissingExtraError(
            "Ray is not installed; --ray and `edgeadapt sweep --ray` need the ray extra: "
            "pip install 'edgeadapt[ray]'"
        ) from None
    return ray


def connect(address: str | None, need_cpus: float = 1.0) -> bool:
    """Start or join Ray unless this process is already connected; True if it connected now.

    ``address``: None or "local" starts Ray on this machine (with at least ``need_cpus``
    logical CPUs, so the actors can always be placed); "auto" or an address joins a cluster.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    common = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    if address in (None, "local"):
        # Ray nices its workers to 15 by default; on a machine shared with other work that
        # starves the rollouts behind everything else. Run them at the learner's priority.
        os.environ.setdefault("RAY_worker_niceness", str(os.getpriority(os.PRIO_PROCESS, 0)))
        ray.init(num_cpus=max(os.cpu_count() or 1, int(-(-need_cpus // 1))), **common)
    else:
        try:
            ray.init(address=address, **common)
        except ConnectionError as exc:
            raise ConfigError(f"cannot join the Ray cluster at {address!r}: {exc}") from None
    return True


class RolloutWorker:
    """A rollout actor: runs shard functions against its cache (no training state)."""

    def __init__(self, num_threads: int) -> None:
        import torch

        torch.set_num_threads(num_threads)
        self.cache = WorkerCache()

    def pid(self) -> int:
        """The actor's process id (fault tests kill it)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node the actor runs on."""
        import ray

        return ray.get_runtime_context().get_node_id()

    def run(self, fn: ShardFn, cfg: Any, weights: Any, job: ShardJob) -> Any:
        return fn(cfg, weights, job, self.cache)


class RayPool:
    """``cfg.workers`` rollout actors; shards are re-collected on a fresh actor if theirs dies."""

    def __init__(self, cfg: RayConfig, num_threads: int = 1) -> None:
        self.ray = import_ray()
        self.cfg = cfg
        self.workers = cfg.workers
        self.owns_ray = connect(cfg.address, cfg.workers * cfg.cpus_per_worker)
        self._check_capacity()
        self._actor_class = self.ray.remote(num_cpus=cfg.cpus_per_worker, max_restarts=0)(
            RolloutWorker
        )
        self.num_threads = num_threads
        self.actors = [self._spawn() for _ in range(cfg.workers)]
        self.replaced = 0  # workers replaced after dying or timing out
        log.info("collecting rollouts on %d Ray workers (%s)", cfg.workers, cfg.address)

    def put(self, weights: Any) -> Any:
        return self.ray.put(weights)

    def pids(self) -> list[int]:
        """Process ids of the current actors."""
        return self.ray.get([a.pid.remote() for a in self.actors])

    def nodes(self) -> list[str]:
        """Ray node ids of the current actors."""
        return self.ray.get([a.node_id.remote() for a in self.actors])

    def map(self, fn: ShardFn, cfg: Any, weights: Any, jobs: list[ShardJob]) -> list[Any]:
        """Run every shard on a free actor; replace dead or overdue actors and re-run their
        shards (up to ``max_retries`` times each). Results in job order."""
        results: dict[int, Any] = {}
        attempts = [0] * len(jobs)
        queue = list(range(len(jobs)))
        free = list(range(len(self.actors)))
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (job, actor slot, start)
        while queue or running:
            while queue and free:
                j, slot = queue.pop(0), free.pop(0)
                ref = self.actors[slot].run.remote(fn, cfg, weights, jobs[j])
                running[ref] = (j, slot, time.monotonic())
            ready, _ = self.ray.wait(list(running), num_returns=1, timeout=POLL_S)
            done = [(ref, *running.pop(ref)[:2]) for ref in ready]
            lost = [(j, slot) for ref, j, slot in done if not self._fetch(ref, j, slot, results)]
            overdue = self._overdue(running)
            lost += overdue
            for j, slot in lost:
                attempts[j] += 1
                if attempts[j] > self.cfg.max_retries:
                    raise RolloutError(
                        f"rollout shard {j} failed on {attempts[j]} workers in a row; giving up"
                    )
                self._replace(slot)
                queue.append(j)
            free += [slot for _, _, slot in done] + [slot for _, slot in overdue]
        return [results[j] for j in range(len(jobs))]

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self.owns_ray:
            self.ray.shutdown()

    # -- helpers ----------------------------------------------------------------------------
    def _fetch(self, ref: Any, job: int, slot: int, results: dict[int, Any]) -> bool:
        """Store a finished shard's result; False if its worker died. An exception raised by
        the shard function itself propagates (as the original exception type)."""
        exc_mod = self.ray.exceptions
        try:
            results[job] = self.ray.get(ref)
        except (exc_mod.RayActorError, exc_mod.WorkerCrashedError) as exc:
            log.warning("rollout worker %d died (%s); replacing it and re-collecting shard %d",
                        slot, type(exc).__name__, job)  # fmt: skip
            return False
        except exc_mod.RayTaskError as exc:
            raise exc.cause if isinstance(exc.cause, Exception) else exc from None
        return True

    def _overdue(self, running: dict) -> list[tuple[int, int]]:
        """(job, slot) of the shards past ``timeout_s``, removed from ``running``."""
        now = time.monotonic()
        late = [ref for ref, (_, _, t0) in running.items() if now - t0 > self.cfg.timeout_s]
        out = []
        for ref in late:
            j, slot, _ = running.pop(ref)
            log.warning("rollout shard %d overran ray.timeout_s on worker %d", j, slot)
            out.append((j, slot))
        return out

    def _replace(self, slot: int) -> None:
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self._spawn()
        self.replaced += 1

    def _spawn(self) -> Any:
        return self._actor_class.remote(self.num_threads)

    def _check_capacity(self) -> None:
        """Fail at once, not hang, when the cluster cannot place every actor."""
        total = float(self.ray.cluster_resources().get("CPU", 0.0))
        need = self.cfg.workers * self.cfg.cpus_per_worker
        if total < need:
            raise ConfigError(
                f"ray.workers={self.cfg.workers} x ray.cpus_per_worker="
                f"{self.cfg.cpus_per_worker} needs {need:g} CPUs; the Ray cluster has {total:g}"
            )
