"""Rollouts and sweeps on a real local Ray (``ray.init(num_cpus=2)``, one instance per module).

The invariants: one Ray worker gives exactly the in-process numbers for every family; a worker
killed mid-collection (SIGKILL on its process) is replaced and its shard re-collected with the
same episodes; a sweep of two seeds ends in one table. Skipped only where Ray is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from test_family_contract import TINY_CONFIGS

from runtime.cli import main
from training.collect import collect_shard, collection_weights
from training.config import RayConfig
from training.pearl import init_state
from training.registry import entry_of, validate_run_config
from training.rollouts import InProcessPool, shard_jobs

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed (the ray extra)")
TIMING = ("wall_s", "env_steps_per_s")


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance shared by this module's tests (starting Ray costs seconds)."""
    if not HAS_RAY:
        pytest.skip("Ray is not installed (the ray extra)")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def tiny(algo: str, **extra: Any) -> Any:
    raw = {**TINY_CONFIGS[algo], "algo": algo, "env": {"name": "point-nav"}, "eval": {"tasks": 4}}
    return validate_run_config({**raw, **extra}, source="tiny")


def trained(cfg: Any, run_dir: Path) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """(metrics rows without timings, final weights) of a tiny run."""
    impl = entry_of(cfg).impl()
    state = impl.train(cfg, run_dir, progress=False)
    nets = impl.nets_of(state)
    modules = nets.modules() if hasattr(nets, "modules") and cfg.algo != "rl2" else None
    if cfg.algo == "maml":
        weights = {"theta": nets.theta.detach()}
    elif modules is not None:
        weights = {f"{n}.{k}": v for n, m in modules.items() for k, v in m.state_dict().items()}
    else:
        weights = dict(nets.state_dict())
    rows = [{k: v for k, v in r.items() if k not in TIMING} for r in state.history]
    return rows, weights


@needs_ray
@pytest.mark.parametrize("algo", ["pearl", "rl2", "maml"])  # the oracle shares PEARL's shards
def test_one_ray_worker_gives_the_in_process_numbers(local_ray, algo: str, tmp_path: Path):
    rows, weights = trained(tiny(algo), tmp_path / "local")
    ray_rows, ray_weights = trained(
        tiny(algo, ray={"address": "local", "workers": 1}), tmp_path / "ray"
    )
    assert rows[-1]["env_steps"] > 0 and len(rows) == TINY_CONFIGS[algo]["train"]["iterations"]
    assert ray_rows == rows
    assert weights.keys() == ray_weights.keys()
    assert all(torch.equal(weights[k], ray_weights[k]) for k in weights)


@needs_ray
@pytest.mark.timeout(180)
def test_a_killed_worker_is_replaced_and_its_shard_recollected(local_ray):
    from training.ray_pool import RayPool

    cfg = tiny("pearl")
    state = init_state(cfg)
    pool = RayPool(RayConfig(address="local", workers=2))
    try:
        # shards of ~1-4 s each (more under load), so that the kill lands while they run
        jobs = shard_jobs(pool, state.train_tasks[:4], state.rng, episodes=200, mode="online")
        weights = collection_weights(state.nets)
        expected = InProcessPool().map(collect_shard, cfg, weights, jobs)
        before = pool.pids()
        killer = threading.Thread(target=_kill_after, args=(before[0], 0.2))
        killer.start()
        got = pool.map(collect_shard, cfg, pool.put(weights), jobs)
        killer.join()
        after = pool.pids()
    finally:
        pool.close()
    assert pool.replaced == 1
    assert after[0] != before[0] and after[1] == before[1]
    for g, e in zip(got, expected, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(g.steps, e.steps, strict=True))
        assert np.array_equal(g.return_sum, e.return_sum)


def _kill_after(pid: int, delay_s: float) -> None:
    time.sleep(delay_s)
    os.kill(pid, signal.SIGKILL)


@needs_ray
def test_a_sweep_of_two_seeds_ends_in_one_table(local_ray, tmp_path: Path, capsys):
    config = _write_tiny_pair(tmp_path)
    out = tmp_path / "sweep"
    args = ["sweep", str(config), "--seeds", "0-1", "--splits", "test", "--out", str(out)]
    assert main([*args, "--ray", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["seeds"] == [0, 1] and summary["mode"] == "ray (local)"
    runs = summary["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for s in (0, 1):  # each seed trained its own oracle and was scored against it
        cfg = yaml.safe_load((out / f"seed-{s}" / "tiny-pearl" / "config.yaml").read_text())
        assert cfg["seed"] == s and cfg["eval"]["oracle_run"] == str(out / f"seed-{s}/tiny-oracle")
    table = summary["table"]["test"]["normalized_by_episode"]
    values = np.array([r["test"]["normalized_by_episode"] for r in runs])
    assert len(table) == 3  # eval.episodes
    for e, row in enumerate(table):
        assert row["mean"] == pytest.approx(values[:, e].mean())
        assert row["std"] == pytest.approx(values[:, e].std())
        assert row["min"] == values[:, e].min() and row["max"] == values[:, e].max()
    assert values[0, 0] != values[1, 0]  # two seeds, two different runs
    md = (out / "sweep.md").read_text()
    assert "| normalized_by_episode | 1 |" in md and json.loads((out / "sweep.json").read_text())


def _write_tiny_pair(folder: Path) -> Path:
    """tiny.yaml (PEARL) and its sibling tiny-oracle.yaml."""
    for algo, name in (("pearl", "tiny.yaml"), ("oracle", "tiny-oracle.yaml")):
        raw = {**TINY_CONFIGS[algo], "algo": algo, "env": {"name": "point-nav"},
               "eval": {"tasks": 4}}  # fmt: skip
        (folder / name).write_text(yaml.safe_dump(json.loads(json.dumps(raw))))
    return folder / "tiny.yaml"


def test_without_the_ray_extra_train_ray_is_a_one_line_error(tmp_path: Path):
    """Runs whether or not Ray is installed: the import is blocked in the child process."""
    config = _write_tiny_pair(tmp_path)
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from runtime.cli import main\n"
        f"sys.exit(main(['train', {str(config)!r}, '--out', {str(tmp_path / 'r')!r}, '--ray']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0
    assert "pip install 'edgeadapt[ray]'" in out.stderr


def test_seed_lists_parse_and_bad_ones_are_one_line_errors():
    from runtime.errors import ConfigError
    from training.sweep import parse_seeds

    assert parse_seeds("0-5") == [0, 1, 2, 3, 4, 5]
    assert parse_seeds("1-3,9,2") == [1, 2, 3, 9]
    for bad in ("", "a-b", "-1", "3-x"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


@needs_ray
def test_an_error_inside_a_shard_surfaces_as_itself_not_as_a_retry(local_ray):
    from runtime.errors import UnknownNameError
    from training.ray_pool import RayPool

    good = tiny("pearl")
    bad = tiny("pearl", env={"name": "no-such-family"})
    state = init_state(good)
    pool = RayPool(RayConfig(address="local", workers=1))
    try:
        jobs = shard_jobs(pool, state.train_tasks[:2], state.rng, mode="prior")
        with pytest.raises(UnknownNameError, match="no-such-family"):
            pool.map(collect_shard, bad, pool.put(collection_weights(state.nets)), jobs)
    finally:
        pool.close()
    assert pool.replaced == 0
