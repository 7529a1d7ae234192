"""``edgeadapt bench adapt``: time of a bundle's episodic adaptation, in its own adapt graph.

Any bundle that declares an episodic adaptation (MAML's inner gradient step) qualifies: an
:class:`runtime.agent.Agent` flies the declared number of exploration episodes on one held-out
task of the bundle's family (its own seeded exploration noise), adapts once, and the feeds of
that adaptation are replayed through the agent's own adapt session (the tuned one-thread
session the device uses), ``runs`` times after a warm-up. Median and p99 in µs. Numpy and
onnxruntime only.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from runtime.agent import Agent, AgentConfig
from runtime.bundle import load_verified
from runtime.errors import BundleError
from runtime.evaluation import held_out_tasks, rollout
from runtime.providers import CPU
from runtime.tasks import make_family

WARMUP = 20


def bench_adapt(
    bundle_dir: str | Path, runs: int = 300, pubkey: str | None = None, seed: int = 0
) -> dict[str, Any]:
    """Median and p99 µs of one adaptation on a buffer the bundle's agent flew itself."""
    bundle_dir = Path(bundle_dir)
    manifest = load_verified(bundle_dir, pubkey)
    episodic = manifest.adaptation.episodic
    if episodic is None:
        raise BundleError(
            f"{bundle_dir}: {manifest.algorithm} declares no episodic adaptation (nothing to time)"
        )
    agent = Agent(manifest, bundle_dir, [CPU], AgentConfig(seed=seed))
    buffer = agent._episodes  # the agent's own episode buffer and adapt session
    if buffer is not None:
        buffer.keep_last_feeds = True
    tasks = held_out_tasks(make_family(manifest.env), "test", 1, seed)
    rollout(agent, manifest.env, tasks, episodes=episodic.every_episodes, seed=seed)
    feeds = buffer.last_feeds if buffer is not None else None
    if feeds is None:
        raise BundleError(f"{bundle_dir}: the agent did not adapt after the exploration episodes")
    times = _timed(lambda: buffer.session.run_feeds(feeds), runs)
    valid = int(feeds[episodic.mask].sum())
    return {
        "bundle": str(bundle_dir),
        "env": manifest.env,
        "algorithm": manifest.algorithm,
        "graph": episodic.graph,
        "episodes": episodic.every_episodes,
        "transitions": valid,
        "capacity": int(feeds[episodic.mask].size),
        "runs": runs,
        "adapt_us_median": float(np.median(times)),
        "adapt_us_p99": float(np.percentile(times, 99)),
        "threads": 1,
        "load_average": os.getloadavg()[0],
        "cpu_count": os.cpu_count(),
    }


def _timed(call: Any, runs: int) -> np.ndarray:
    for _ in range(WARMUP):
        call()
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter_ns()
        call()
        times[i] = (time.perf_counter_ns() - start) / 1e3
    return times
