"""The latent probe (``edgeadapt bench latent-probe``): its search finds a known best latent, never
scores below its starting point, and splits a run's gap to the oracle."""

from __future__ import annotations

import json

import numpy as np
import torch
from bundle_fixtures import SMALL, make_run

from runtime.cli import main
from runtime.evaluation import held_out_tasks, rollout
from runtime.tasks import make_family
from training.checkpoint import load_run
from training.evaluate import policy_for
from training.probe import FixedLatentPolicy, latent_probe, search_latents


class GoToLatent:
    """A point-nav actor that drives to the point z: the best fixed latent is the goal itself."""

    def deterministic(self, obs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return torch.clamp(10.0 * (z - obs), -1.0, 1.0)


def test_search_finds_the_goal_for_an_actor_that_drives_to_its_latent():
    tasks = held_out_tasks(make_family("point-nav"), "test", 6, 0)
    start = np.zeros((6, 2), dtype=np.float32)
    z, score = search_latents(GoToLatent(), "point-nav", tasks, start, 1.0, 0, 64, 15)
    assert np.linalg.norm(z - tasks, axis=1).max() < 0.05
    # The goal itself as the latent is the optimum; the search gets within a few cm of it.
    best = rollout(FixedLatentPolicy(GoToLatent(), tasks), "point-nav", tasks, 1, 0)
    assert np.all(score >= best.returns_TE[:, 0] - 0.3)
    far = rollout(FixedLatentPolicy(GoToLatent(), start), "point-nav", tasks, 1, 0)
    assert np.all(score > far.returns_TE[:, 0] + 5.0)


def test_probe_never_scores_below_the_belief_it_starts_from(tmp_path):
    run_dir = make_run(tmp_path / "run", SMALL)
    report = latent_probe(run_dir, "test", episodes=2, tasks=5, population=16, iterations=3)
    run = load_run(run_dir)
    tasks = held_out_tasks(run.family, "test", 5, 0)
    adaptive = policy_for(run)
    rollout(adaptive, "point-nav", tasks, 2, 0)
    fixed = FixedLatentPolicy(run.nets.actor, adaptive.belief.mean)
    start = rollout(fixed, "point-nav", tasks, 1, 0)
    assert report.probe_return >= start.returns_TE.mean() - 1e-6
    assert report.tasks == 5 and len(report.adaptive_return_by_episode) == 2
    assert report.oracle_return is None and report.actor_gap is None  # no oracle configured


def test_cli_prints_the_gap_split_against_an_oracle(tmp_path, capsys):
    pearl = make_run(tmp_path / "pearl", SMALL)
    oracle = make_run(tmp_path / "oracle", (*SMALL, "algo=oracle"))
    argv = ["bench", "latent-probe", str(pearl), "--oracle", str(oracle), "--tasks", "4"]
    assert main([*argv, "--population", "8", "--iterations", "2", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["tasks"], r["population"], r["iterations"]) == (4, 8, 2)
    assert np.isfinite(r["oracle_return"]) and np.isfinite(r["actor_gap"])
    assert len(r["inference_gap_by_episode"]) == r["episodes"] == 3
    assert main(["bench", "latent-probe", str(oracle)]) == 2
    assert "the latent probe needs a PEARL run" in capsys.readouterr().err
    assert main(["bench", "latent-probe", str(pearl), "--population", "1"]) != 0
    assert "need population >= 2" in capsys.readouterr().err
