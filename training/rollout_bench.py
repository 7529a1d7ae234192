"""``edgeadapt bench rollouts``: env-steps/s of rollout collection in-process and on Ray.

What is timed is one collection call as the training loop makes it: the weights put (into the
object store on Ray), the shards run, the episodes back in the learner's process. The shard
function is PEARL's online collection (context encoder + belief update + actor, one torch
forward per step per batch) on the configured family: the Python loop the issue is about. Each
setting gets one untimed warm-up call (actor start, imports, environment construction), then
``repeats`` timed calls, interleaved across the settings (all pools are open at once); medians
are reported.

The projection to more workers is a model, not a measurement (its assumptions are in the
output): W workers each fly a shard of this call's size in ``t_shard + o``, the in-process call
time plus Ray's per-call overhead measured at one worker, each on a core of its own.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.tasks import Split
from training.agent import build_networks
from training.collect import collect_shard, collection_weights
from training.config import RayConfig, load_train_config
from training.rollouts import InProcessPool, RolloutPool, WorkerCache, shard_jobs

PROJECT_TO = (16, 64)


def bench_rollouts(
    config: Path,
    family: str,
    workers: list[int],
    tasks: int,
    episodes: int,
    repeats: int,
    address: str | None,
    overrides: list[str],
) -> dict[str, Any]:
    """Env-steps/s per worker count (0 = in-process) in one process, plus the Ray overhead at
    one worker and the projection; one JSON-able dict."""
    cfg = load_train_config(config, [f"env.name={family}", "train.num_threads=1", *overrides])
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    env = WorkerCache().env(cfg, 1)
    nets = build_networks(cfg, env.spec)
    task_set = env.sample_tasks(Split.TRAIN, tasks, np.random.default_rng(cfg.seed))
    steps = tasks * episodes * env.spec.horizon
    owns = False
    if any(w > 0 for w in workers):
        from training.ray_pool import connect

        owns = connect(address, sum(workers))
    try:
        rows = _measure_all(cfg, nets, task_set, episodes, repeats, workers, address)
    finally:
        if owns:
            import ray

            ray.shutdown()
    result: dict[str, Any] = {
        "config": str(config), "family": family, "tasks": tasks, "episodes": episodes,
        "horizon": env.spec.horizon, "env_steps_per_call": steps, "repeats": repeats,
        "torch_threads": 1, "rows": rows,
    }  # fmt: skip
    by_w = {r["workers"]: r for r in rows}
    if 0 in by_w and 1 in by_w:
        result.update(_overhead_and_projection(by_w[0], by_w[1], steps))
    return result


def _measure_all(
    cfg: Any,
    nets: Any,
    task_set: np.ndarray,
    episodes: int,
    repeats: int,
    workers: list[int],
    address: str | None,
) -> list[dict[str, Any]]:
    """Every setting's pool open at once; timed calls interleaved round-robin, so a change
    of load on a shared machine hits every setting alike."""
    steps = len(task_set) * episodes * cfg_horizon(cfg)
    pools, startup = [], []
    for w in workers:
        start = time.perf_counter()
        pools.append(_pool(w, address))
        startup.append(time.perf_counter() - start)
    rng = np.random.default_rng(0)
    try:
        warmup = [_one_call(p, cfg, nets, task_set, episodes, rng) for p in pools]
        times: list[list[float]] = [[] for _ in pools]
        for _ in range(repeats):
            for i, p in enumerate(pools):
                times[i].append(_one_call(p, cfg, nets, task_set, episodes, rng))
    finally:
        for p in pools:
            p.close()
    return [
        {
            "workers": w,
            "where": "in-process" if w == 0 else "ray",
            "call_s_median": round(statistics.median(t), 4),
            "call_s_all": [round(x, 4) for x in t],
            "warmup_call_s": round(warm, 3),
            "pool_start_s": round(up, 3),
            "env_steps_per_s": round(steps / statistics.median(t), 1),
        }
        for w, t, warm, up in zip(workers, times, warmup, startup, strict=True)
    ]


def cfg_horizon(cfg: Any) -> int:
    return WorkerCache().env(cfg, 1).spec.horizon


def _pool(workers: int, address: str | None) -> RolloutPool:
    if workers == 0:
        return InProcessPool()
    from training.ray_pool import RayPool

    return RayPool(RayConfig(address=address or "local", workers=workers))


def _one_call(
    pool: RolloutPool,
    cfg: Any,
    nets: Any,
    task_set: np.ndarray,
    episodes: int,
    rng: np.random.Generator,
) -> float:
    """Seconds of one collection call: weights out, shards run, episodes back."""
    start = time.perf_counter()
    weights = pool.put(collection_weights(nets))
    jobs = shard_jobs(pool, task_set, rng, episodes, "online")
    parts = pool.map(collect_shard, cfg, weights, jobs)
    assert sum(p.steps.obs.shape[0] * p.steps.obs.shape[1] for p in parts) > 0
    return time.perf_counter() - start


def _overhead_and_projection(local: dict, one: dict, steps: int) -> dict[str, Any]:
    """Ray's overhead at one worker and the weak-scaling projection: W workers, each flying a
    shard the size of this call (W times the tasks per call)."""
    t0, t1 = local["call_s_median"], one["call_s_median"]
    overhead = max(t1 - t0, 0.0)

    def weak(w: int) -> float:
        return w * steps / (overhead + t0)

    return {
        "ray_overhead_1_worker_s": round(t1 - t0, 4),
        "ray_overhead_1_worker_pct": round(100 * (t1 - t0) / t0, 1),
        "projection": {
            "model": "W workers, each a shard of this call's size: W * S / (t_shard + o)",
            "assumptions": [
                "one free core per worker, the learner on its own core",
                "t_shard = the in-process call measured here (S env-steps)",
                "o = Ray's per-call overhead at 1 worker, measured here, not growing with W",
                "collection only: the learner's updates and its writes of W shards of episodes "
                "into its buffer are not included",
                "not strong scaling: splitting one call's tasks finer does not divide its time, "
                "the per-step policy forward is a fixed cost per shard",
            ],
            "t_shard_s": t0,
            "o_s": round(overhead, 4),
            "env_steps_per_s": {w: round(weak(w), 1) for w in PROJECT_TO},
        },
    }
