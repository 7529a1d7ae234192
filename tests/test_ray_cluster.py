"""Rollouts on a simulated two-node Ray cluster (``ray.cluster_utils.Cluster``, 1 CPU per node).

Two rollout actors land on two nodes; the shards they collect are exactly what the same jobs
give in-process, and a tiny training run completes across the nodes. Skipped only where Ray is
not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from test_family_contract import TINY_CONFIGS

from training.collect import collect_shard, collection_weights
from training.config import RayConfig
from training.pearl import init_state, train
from training.registry import validate_run_config
from training.rollouts import InProcessPool, shard_jobs

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("ray") is None, reason="Ray is not installed (the ray extra)"
)


def tiny_pearl(**extra):
    raw = {**TINY_CONFIGS["pearl"], "env": {"name": "point-nav"}, "eval": {"tasks": 4}}
    return validate_run_config({**raw, "algo": "pearl", **extra}, source="tiny")


def test_two_nodes_collect_what_the_same_jobs_give_in_process(ray_two_nodes):
    from training.ray_pool import RayPool

    cfg = tiny_pearl()
    state = init_state(cfg)
    pool = RayPool(RayConfig(address="auto", workers=2))
    try:
        assert len(set(pool.nodes())) == 2  # one actor per node (1 CPU each)
        jobs = shard_jobs(pool, state.train_tasks[:6], state.rng, episodes=2, mode="prior")
        weights = collection_weights(state.nets)
        got = pool.map(collect_shard, cfg, pool.put(weights), jobs)
    finally:
        pool.close()
    expected = InProcessPool().map(collect_shard, cfg, weights, jobs)
    assert [len(j.rows) for j in jobs] == [3, 3]
    for g, e in zip(got, expected, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(g.steps, e.steps, strict=True))


def test_a_tiny_run_trains_across_the_nodes(ray_two_nodes, tmp_path: Path):
    cfg = tiny_pearl(ray={"address": "auto", "workers": 2})
    state = train(cfg, tmp_path / "run", progress=False)
    assert state.iteration == 2 and state.updates == 2 * 5
    assert (tmp_path / "run" / "checkpoints" / "latest.pt").is_file()
